"""The layer-wise one-shot engine.

Capture the inputs of the first decoder block, then for each block: one forward
of the calibration data with hooks collects every statistic the recipe needs
(activation norms; the Hessian only when asked), the stages run on every Linear
and write back, and one more forward with the compressed weights produces the
next block's inputs (so later blocks see the errors of earlier ones). Only one
block's working set and the calibration activations are in memory at a time.

A stage that asks for DENSE_CROSS (GPTQ's ``dense_target``) adds a second activation stream, the
dense model's own: the statistics forward then runs each batch through the block twice, on the
dense model's inputs and on the compressed model's, and pairs every Linear's two inputs token
by token (``run_block_paired``); the dense stream's outputs are the dense model's next inputs.
"""
from __future__ import annotations

import logging
import os
import signal
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import dist
from ..errors import NumericalError, SlimkitError
from ..methods.base import (DENSE_CROSS, HESSIAN, INPUT_SAMPLE, SAMPLE_ROWS, BlockContext, LayerPosition, LinearState, Stage,
                            model_gqa)
from ..methods.rtn import RTN
from ..models.experts import UnfusedExperts, is_fused_experts
from ..models.layout import ModelLayout, ResidentBlocks
from ..ops.reduce import all_finite, sum_squares
from ..recipe import Recipe
from .checkpoint import Checkpoint
from .device import Placement, bound_host_heap, free_device_memory, release_host_memory, to_device
from .hooks import ErrorProbe, StatsCollector, capture_inputs, run_block, run_block_paired

log = logging.getLogger(__name__)


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]
    rel_error: float  # ||(W - W_hat) x|| / ||W x|| on calibration inputs of the compressed model
    bits: dict[str, int]  # stored bits by part
    density: float  # fraction of weights kept
    grid: str  # e.g. "W4 g64 asym" or "fp16"
    rank: int = 0  # low-rank adapter rank
    seconds: dict[str, float] = field(default_factory=dict)
    notes: dict = field(default_factory=dict)

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]


@dataclass
class BlockReport:
    index: int
    rel_error: float  # block output error vs the dense block on the same inputs
    seconds: float


@dataclass
class CompressionResult:
    layers: list[LayerReport]
    blocks: list[BlockReport]
    timings: dict[str, float]
    calib_sequences: int
    calib_seqlen: int

    def bits_per_weight(self) -> float:
        total = sum(sum(l.bits.values()) for l in self.layers)
        return total / max(1, sum(l.numel for l in self.layers))

    def bits_by_part(self) -> dict[str, float]:
        n = max(1, sum(l.numel for l in self.layers))
        parts: dict[str, float] = defaultdict(float)
        for l in self.layers:
            for k, v in l.bits.items():
                parts[k] += v / n
        return dict(parts)

    def to_dict(self) -> dict:
        return {"layers": [asdict(l) for l in self.layers], "blocks": [asdict(b) for b in self.blocks],
                "timings": self.timings, "calib_sequences": self.calib_sequences,
                "calib_seqlen": self.calib_seqlen, "bits_per_weight": self.bits_per_weight(),
                "bits_by_part": self.bits_by_part()}


def activation_buffer(folder: str | None, name: str, like: torch.Tensor, copy: bool = True) -> torch.Tensor:
    """A tensor shaped like ``like`` (its values, or uninitialised): in RAM, or, with ``folder``,
    a memory-mapped file there, whose pages the OS may write out and drop under pressure."""
    if folder is None:
        return like if copy else torch.empty_like(like)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"activations-{name}.bin")
    with open(path, "wb") as f:  # allocated now: a full disk is ENOSPC here, not SIGBUS on a later page write
        nbytes = like.numel() * like.element_size()
        if nbytes:
            os.posix_fallocate(f.fileno(), 0, nbytes)
    t = torch.from_file(path, shared=True, size=like.numel(), dtype=like.dtype).view(like.shape)
    if copy:
        t.copy_(like)
    return t


def place_activations(inputs: torch.Tensor, placement: Placement, folder: str | None) -> torch.Tensor:
    """The captured block inputs (N, S, H) in the compute dtype, where they will live: on the
    compute device when the three activation buffers fit in half of its free memory, else in
    (pinned, for fast copies) CPU memory, or memory-mapped files with ``folder``."""
    inputs = inputs.to(placement.compute)
    if folder is None and placement.device.type == "cuda":
        free = free_device_memory(placement.device) or 0
        if 3 * inputs.numel() * inputs.element_size() <= free // 2:
            return inputs.to(placement.device)
        log.info("calibration activations (%.1f GiB x 3) stay in CPU memory: the device has %.1f GiB free",
                 inputs.numel() * inputs.element_size() / 2**30, free / 2**30)
        return inputs.pin_memory()
    return inputs


def target_linears(source, recipe: Recipe, index: int, block: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in source.linears(index, block).items() if not recipe.ignores(n)}


MIN_EXPERT_TOKENS = 32  # an expert routed fewer calibration tokens is compressed data-free


@dataclass(frozen=True)
class RecipeFit:
    targets: int  # the Linears the recipe compresses
    record_bytes: int  # at least the bytes of their state records (the disk check counts them)
    finetune_bytes: int = 0  # the fp32 base weights a fine-tuning recipe checkpoints beside them


def check_recipe_fits(source, recipe: Recipe, n_gqa: int = 1) -> RecipeFit:
    """Fail before any work if a stage cannot handle some layer of the block ``source``
    (ResidentBlocks or StreamedModel), fused experts included (one Linear triple per expert).
    Returns the number of targets and the size of their state records (an expert may get the
    data-free grid instead: the larger of the two counts) and of the base weights that a recipe
    with a ``finetune:`` section checkpoints for the adapters it trains (when the record does
    not hold the base already)."""
    count = records = finetune = 0
    fallback = data_free_stages(recipe)
    free = Recipe("data-free", fallback) if fallback else None
    for i in range(len(source)):
        block = source.peek(i)
        shapes = {name: (lin.out_features, lin.in_features)
                  for name, lin in target_linears(source, recipe, i, block).items()}
        for mname, mod in block.named_modules():
            if mname and is_fused_experts(mod):
                E, two_i, H = mod.gate_up_proj.shape
                base = f"{source.block_prefix(i)}{mname}"
                for e in range(E):
                    for proj, shape in (("gate_proj", (two_i // 2, H)), ("up_proj", (two_i // 2, H)),
                                        ("down_proj", (H, two_i // 2))):
                        if not recipe.ignores(f"{base}.{e}.{proj}"):
                            shapes[f"{base}.{e}.{proj}"] = shape
        position = LayerPosition(i, len(source), n_gqa)
        for name, (out_f, in_f) in shapes.items():
            for stage in recipe.layer_stages:
                stage.check_layer(name, out_f, in_f)
            parts = recipe.record_parts(name, out_f, in_f, position)
            records += max(sum(parts.values()), free.record_bytes(name, out_f, in_f, position) if free else 0)
            if recipe.finetune is not None and "L" in parts and "weight" not in parts:
                finetune += 4 * out_f * in_f
            count += 1
    return RecipeFit(count, records, finetune)


def data_free_stages(recipe: Recipe) -> list[Stage]:
    """What an expert that saw too few calibration tokens gets: round-to-nearest on the grid of
    each quantizing stage of the recipe (sparsifiers and adapter stages are skipped)."""
    out = []
    for st in recipe.layer_stages:
        bits = getattr(st, "bits", None)
        if st.quantizes and isinstance(bits, int) and 2 <= bits <= 8:
            g = getattr(st, "group_size", 128)
            out.append(RTN(bits=bits, group_size=g if isinstance(g, int) or g is None else 128,
                           symmetric=bool(getattr(st, "symmetric", False))))
    return out


def compress_model(model: nn.Module, layout: ModelLayout, recipe: Recipe, calib_ids: torch.Tensor, *,
                   batch_size: int = 8, probe_sequences: int = 8, progress: bool = True,
                   on_layer=None, checkpoint: Checkpoint | None = None, on_block=None,
                   on_restore=None, source=None, after_block=None,
                   activations: str | None = None, placement: Placement | None = None) -> CompressionResult:
    """Compress ``model`` in place. ``calib_ids`` (N, S) token windows; data-free recipes use only
    the first ``probe_sequences`` of them, to measure errors. ``on_layer(state)`` sees every
    finished LinearState (e.g. to persist grids and masks) before it is dropped.

    With a ``checkpoint``, every finished block is committed to it together with the payload
    ``on_block(i) -> (tensors, meta)`` returns, and a checkpoint that already holds finished
    blocks is resumed: their compressed weights are loaded, ``on_restore(i, tensors, meta)`` gets
    their payloads back, and compression continues from the first unfinished block.

    ``source`` gives the blocks (default: the model's own, in memory; a StreamedModel reads
    each from disk), ``after_block(i, block)`` sees each finished block before it is dropped
    (e.g. to write it out), and ``activations`` names a folder where the calibration
    activations live as memory-mapped files instead of in RAM.

    ``placement`` says where blocks compute and in which dtype (default: the CPU, fp32): each
    block is moved there for its forwards and stages and moved back to its storage (device and
    dtype) before ``after_block`` and the checkpoint see it."""
    t_start = time.perf_counter()
    timings: dict[str, float] = defaultdict(float)
    prior_total = 0.0
    needs = recipe.needs
    data_free = not needs
    if data_free:
        calib_ids = calib_ids[:probe_sequences]
    source = source if source is not None else ResidentBlocks(model, layout)
    placement = placement or Placement.make("cpu", torch.float32)
    bound_host_heap()  # peak memory must not creep up with the number of blocks
    dev, cdt = placement.device, placement.compute
    check_recipe_fits(source, recipe)
    refiners = [st for st in recipe.layer_stages if type(st).refine_block is not Stage.refine_block]
    n_sequences = int(calib_ids.shape[0])
    paired = DENSE_CROSS in needs  # a second activation stream: the dense model's own
    if paired:
        if dist.active():
            raise SlimkitError("dense_target calibration cannot run split across workers yet; run one process")
        if any(is_fused_experts(m) for j in range(len(source)) for m in source.peek(j).modules()):
            raise SlimkitError("dense_target calibration cannot pair the inputs of mixture-of-experts layers "
                               "(the dense and the compressed model route tokens differently)")
    if dist.active():  # torchrun: this worker's share of the calibration windows
        if refiners:
            raise SlimkitError(f"stage {refiners[0].name!r} refines whole blocks on the calibration data and "
                               "cannot run split across workers yet; run it in one process")
        if checkpoint is not None:
            raise SlimkitError("checkpoints (--resume) are not supported with several workers yet")
        if any(is_fused_experts(m) for j in range(len(source)) for m in source.peek(j).modules()):
            raise SlimkitError("mixture-of-experts models cannot be split across workers yet (an expert's "
                               "statistics would be all-reduced only on the workers it was routed to); run one process")
        if n_sequences < dist.world_size():
            raise SlimkitError(f"{n_sequences} calibration sequences cannot be split across "
                               f"{dist.world_size()} workers")
        calib_ids = calib_ids[dist.shard(n_sequences)]
    probe_batches = max(1, -(-min(probe_sequences, calib_ids.shape[0]) // batch_size))

    t = time.perf_counter()
    # block 0's inputs, and the keyword arguments the model gives each block (its own mask)
    inputs, kwargs_by_block = capture_inputs(model, [source.peek(j) for j in range(len(source))],
                                             calib_ids, batch_size)
    timings["capture"] += time.perf_counter() - t
    if dist.any_true(not all_finite(inputs)):  # every worker raises, none waits in a collective
        raise NumericalError("the embeddings of the calibration data contain NaN/Inf")
    inputs = activation_buffer(activations, "a", place_activations(inputs, placement, activations))
    dense_out = activation_buffer(activations, "b", inputs, copy=False)
    next_in = activation_buffer(activations, "c", inputs, copy=False)
    if paired:  # the dense model's inputs of the block, and of the next one
        dense_in = activation_buffer(activations, "d", inputs, copy=False)
        dense_in.copy_(inputs)  # a buffer of its own (in RAM activation_buffer's copy would be inputs itself)
        dense_next = activation_buffer(activations, "e", inputs, copy=False)

    layers: list[LayerReport] = []
    block_reports: list[BlockReport] = []
    start = checkpoint.done if checkpoint is not None else 0
    if start:
        if start > len(source):
            raise NumericalError(f"the checkpoint holds {start} blocks but the model has {len(source)}")
        for j in range(start):  # a streamed block is already in its output shard
            payload, meta = checkpoint.restore_block(j, source.get(j) if source.resident else None)
            if on_restore is not None:
                on_restore(j, payload, meta)
        restored = checkpoint.restore_inputs(dev)
        if restored.shape != inputs.shape:
            raise NumericalError(f"the checkpoint's activations {tuple(restored.shape)} do not match the "
                                 f"calibration data {tuple(inputs.shape)}")
        inputs.copy_(restored)
        del restored
        if paired:
            restored = checkpoint.restore_dense_inputs()
            if restored.shape != inputs.shape:
                raise NumericalError(f"the checkpoint's dense activations {tuple(restored.shape)} do not match the "
                                     f"calibration data {tuple(inputs.shape)}")
            dense_in.copy_(restored)
            del restored
        prog = checkpoint.progress
        layers = [LayerReport(**(d | {"shape": tuple(d["shape"])})) for d in prog["layers"]]
        block_reports = [BlockReport(**d) for d in prog["blocks"]]
        timings.update(prog["timings"])
        prior_total = timings.pop("total", 0.0)
    fault = os.environ.get("SLIMKIT_FAULT_KILL_AFTER_BLOCK")  # tests: SIGKILL right after a commit
    bar = tqdm(range(start, len(source)), desc=f"compress [{recipe.name}]", unit="block", disable=not progress,
               initial=start, total=len(source))
    gqa = model_gqa(getattr(model, "config", None))
    for i in bar:
        tb = time.perf_counter()
        t = time.perf_counter()
        block = source.get(i)
        timings["load_block"] += time.perf_counter() - t
        kwargs_list = kwargs_by_block[i]
        t = time.perf_counter()
        home = placement.onload(block)
        timings["onload"] += time.perf_counter() - t
        experts = UnfusedExperts(block)  # fused expert tensors -> one Linear triple per expert
        linears = target_linears(source, recipe, i, block)
        prefix = source.block_prefix(i)
        stored = {n: home.get(n[len(prefix):] + ".weight", (None, placement.storage))[1] for n in linears}
        for name, p in block.named_parameters():  # before any forward spreads it: name the tensor
            if not all_finite(p):
                raise NumericalError(f"block {i}: {layout.blocks_path}.{i}.{name} of the input model contains NaN/Inf")

        # 1. one forward with the original weights: statistics + dense outputs
        t = time.perf_counter()
        collector = StatsCollector(linears, want_hessian=HESSIAN in needs,
                                   sample_rows=SAMPLE_ROWS if INPUT_SAMPLE in needs else 0,
                                   optional=experts.linears, min_tokens=MIN_EXPERT_TOKENS, want_cross=paired)
        if paired:
            if experts.linears:
                raise SlimkitError(f"block {i}: dense_target calibration cannot pair the inputs of "
                                   "mixture-of-experts layers (the two models route tokens differently)")
            run_block_paired(block, inputs, dense_in, kwargs_list, batch_size, dense_out, dense_next, collector,
                             device=dev, dtype=cdt)
            stats = collector.finalize()
        elif data_free:
            run_block(block, inputs, kwargs_list, batch_size, out=dense_out, device=dev, dtype=cdt)
            stats = {}
        else:
            with collector.attach():
                run_block(block, inputs, kwargs_list, batch_size, out=dense_out, on_batch=collector.new_batch,
                          device=dev, dtype=cdt)
            stats = collector.finalize()
        timings["stats_forward"] += time.perf_counter() - t

        # 2. the stages on every Linear, written back
        originals: dict[str, torch.Tensor] = {}
        states: dict[str, LinearState] = {}
        for name, lin in linears.items():
            state = LinearState.from_weight(name, lin.weight, LayerPosition(i, len(source), gqa))
            starved = collector.starved.get(name)
            if starved is not None:  # an expert that (almost) no calibration token was routed to
                for stage in data_free_stages(recipe):
                    state = stage.run(state, None)
                state.notes["data_free"] = (f"expert routed {starved} calibration tokens (< {MIN_EXPERT_TOKENS}): "
                                            f"{', '.join(s.describe() for s in data_free_stages(recipe)) or 'left dense'}")
                log.info("%s: %s", name, state.notes["data_free"])
            else:
                for stage in recipe.layer_stages:
                    state = stage.run(state, stats.get(name))
            for sname, sec in state.notes.get("seconds", {}).items():
                timings[f"stage:{sname}"] += sec
            if not all_finite(state.weight):
                raise NumericalError(f"block {i}: {name} became NaN/Inf after compression")
            originals[name] = state.original
            lin.weight.data.copy_(placement.as_stored(state.effective_weight(), stored[name]))
            dist.broadcast(lin.weight.data)  # every worker continues with worker 0's result
            states[name] = state
        del stats
        if refiners:
            ctx = BlockContext(i, block, linears, states, inputs.to(dev), dense_out.to(dev),
                               to_device(kwargs_list, dev, cdt), batch_size, stored=stored)
            for st in refiners:
                t = time.perf_counter()
                st.refine_block(ctx)
                timings[f"refine:{st.name}"] += time.perf_counter() - t

        # 3. one forward with the compressed weights: the next block's inputs, and errors
        t = time.perf_counter()
        probe = ErrorProbe(linears, originals, probe_batches)
        with probe.attach():
            run_block(block, inputs, kwargs_list, batch_size, out=next_in, on_batch=probe.new_batch,
                      device=dev, dtype=cdt)
        timings["next_forward"] += time.perf_counter() - t
        if dist.any_true(not all_finite(next_in)):
            raise NumericalError(f"block {i} produces NaN/Inf outputs after compression")
        rel = probe.relative()
        block_layers: list[LayerReport] = []
        for name, state in states.items():
            out_f, in_f = state.weight.shape
            block_layers.append(LayerReport(
                name=name, shape=(out_f, in_f), rel_error=rel[name], bits=state.bits(),
                density=float(state.mask.float().mean()) if state.mask is not None else 1.0,
                grid=state.notes.get("grid") or (state.quant.describe() if state.quant else "fp16"),
                rank=state.rank,
                seconds=dict(state.notes.get("seconds", {})),
                notes={k: v for k, v in state.notes.items() if k != "seconds"}))
            if on_layer is not None:
                on_layer(state)
        del states, originals
        layers += block_layers

        sq = dist.all_reduce_sum(torch.stack([sum_squares(next_in - dense_out), sum_squares(dense_out)]))
        err = (sq[0] / sq[1].clamp_min(1e-60)).sqrt().item()
        experts.refuse()  # the compressed expert weights go back into the fused tensors
        t = time.perf_counter()
        placement.offload(block, home)
        timings["offload"] += time.perf_counter() - t
        block_reports.append(BlockReport(i, err, time.perf_counter() - tb))
        bar.set_postfix(out_err=f"{err:.4f}")
        log.debug("block %d: output rel. error %.5f", i, err)
        if after_block is not None:
            t = time.perf_counter()
            after_block(i, block)
            timings["write_block"] += time.perf_counter() - t
        if checkpoint is not None:
            payload, meta = on_block(i) if on_block is not None else ({}, {})
            t = time.perf_counter()
            checkpoint.commit(i, block if source.resident else None, next_in, layers=[asdict(l) for l in block_layers],
                              block_report=asdict(block_reports[-1]),
                              timings=dict(timings) | {"total": prior_total + time.perf_counter() - t_start},
                              payload=payload, payload_meta=meta, dense_inputs=dense_next if paired else None)
            timings["checkpoint"] += time.perf_counter() - t
            if fault is not None and int(fault) == i:
                os.kill(os.getpid(), signal.SIGKILL)
        inputs, next_in = next_in, inputs
        if paired:
            dense_in, dense_next = dense_next, dense_in
        del block, linears
        release_host_memory()  # the block's working set is freed: give it back before the next one
    timings["total"] = prior_total + time.perf_counter() - t_start
    timings["stages"] = sum(v for k, v in timings.items() if k.startswith(("stage:", "refine:")))
    return CompressionResult(layers, block_reports, dict(timings), n_sequences, int(calib_ids.shape[1]))
