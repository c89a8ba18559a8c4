"""Thin orchestration: load, compress, save, evaluate."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import resource
import shutil
import time
from pathlib import Path

import torch

from . import __version__, dist
from .calib import compress_model
from .calib.checkpoint import Checkpoint, files_digest, tensor_digest
from .calib.device import Placement, peak_device_memory_mb, resolve_dtype
from .calib.engine import RecipeFit, check_recipe_fits
from .methods.base import DENSE_CROSS, model_gqa
from .data import calibration_ids, evaluation_ids
from .data.sources import available_memory
from .errors import SlimkitError, is_number
from .finetune import finetune_adapters
from .eval import evaluate
from .eval.perplexity import DenseReference, LinearHead, ReferenceCache, linear_head, reference_summary, windows_key
from .eval.report import write_report
from .models import layout_for, load_model
from .models.layout import ModelLayout, ResidentBlocks
from .models.streaming import StreamedModel
from .models.loading import model_config, resolve
from .recipe import Recipe, load_recipe
from .state_io import StateRecorder

log = logging.getLogger(__name__)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def check_output_dir(out: str | Path, model_spec: str | None = None) -> Path:
    """Refuse an existing non-empty output folder, or one inside the input model's folder."""
    out = Path(out).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SlimkitError(f"output {str(out)!r} already exists and is not empty")
    if model_spec is not None:
        src = Path(model_spec).expanduser()
        if src.exists():
            src = src.resolve()
            src_dir = src if src.is_dir() else src.parent
            if out == src_dir or src_dir in out.parents:
                raise SlimkitError(f"output {str(out)!r} is inside the input model's folder {str(src_dir)!r}")
    return out


def partial_dir(out: Path) -> Path:
    """The hidden folder beside ``out`` where a run writes until it is complete."""
    return out.parent / f".{out.name}.partial"


LOCK = ".lock"  # inside the partial folder: held (flock) for the whole run, released on exit or death


def _lock(tmp: Path, out: Path) -> int:
    """Take the partial folder's exclusive lock, or refuse: another process is writing ``out``."""
    refusal = SlimkitError(f"another slimkit run is writing {str(out)!r} now (its temporary folder "
                           f"{str(tmp)!r} is locked); wait for it or stop it")
    try:
        fd = os.open(tmp / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        raise refusal from None  # the folder went away meanwhile
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.fstat(fd).st_ino != os.stat(tmp / LOCK).st_ino:  # deleted and re-created meanwhile
            raise OSError
    except OSError:
        os.close(fd)
        raise refusal from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def partial_in_use(tmp: Path) -> bool:
    """Whether a live process holds the lock of the partial folder ``tmp``."""
    try:
        fd = os.open(tmp / LOCK, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def _missing_parents(path: Path) -> list[Path]:
    """The ancestors of ``path`` that do not exist yet, nearest first."""
    missing = []
    for p in path.parents:
        if p.exists():
            break
        missing.append(p)
    return missing


def _apply_umask(folder: Path) -> None:
    """Give every file and folder under ``folder`` (itself included) the mode the user's umask asks
    for: some writers (safetensors) create their files 0600 whatever the umask."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(folder, 0o777 & ~mask)
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777 & ~mask)
        for f in files:
            os.chmod(os.path.join(root, f), 0o666 & ~mask)


@contextlib.contextmanager
def atomic_dir(out: Path, *, reuse: bool = False, keep=None):
    """Yield a temporary folder beside ``out``; rename it to ``out`` only if the body succeeds.

    The temporary folder is created atomically and locked for the whole run, so a second run into
    the same ``out`` is refused with one line (even when both start within the same second). On
    failure the folder is removed, unless ``keep(exc)`` says it holds progress worth resuming:
    it returns None (remove), or a hint for the user ("" to keep it silently), which is attached
    to the exception as ``slimkit_hint`` so that the CLI prints it on the error's one line. A
    full disk always removes it (the space is what the user needs back), and so are the parent
    folders this run created. ``reuse`` continues in an existing temporary folder (``--resume``)."""
    created = _missing_parents(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_dir(out)
    fd = None
    try:
        if reuse and tmp.is_dir():
            fd = _lock(tmp, out)
        else:
            try:
                tmp.mkdir()
            except FileExistsError:
                if not (tmp / LOCK).is_file():  # being created right now, or left by an old version
                    raise SlimkitError(f"another slimkit run is writing {str(out)!r} (its temporary folder "
                                       f"{str(tmp)!r} exists); if none is, delete that folder") from None
                fd = _lock(tmp, out)  # refused while a live run holds it
                for child in tmp.iterdir():  # a dead run's leftovers (callers that resume check first)
                    if child.name != LOCK:
                        shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
            if fd is None:
                fd = _lock(tmp, out)
        try:
            check_output_dir(out)  # again, under the lock: a run may have finished into it meanwhile
        except SlimkitError:
            if not reuse:
                shutil.rmtree(tmp, ignore_errors=True)
            os.close(fd)
            raise
    except BaseException:
        for p in created:
            with contextlib.suppress(OSError):
                p.rmdir()
        raise
    try:
        yield tmp
        if out.exists():
            out.rmdir()  # empty, checked before
        _apply_umask(tmp)
        os.replace(tmp, out)  # the lock goes along (still held): a --resume in between finds no partial
        (out / LOCK).unlink(missing_ok=True)
    except BaseException as e:
        disk_full = (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) \
            or "No space left on device" in str(e)  # e.g. from safetensors' own writer
        hint = None if keep is None or disk_full else keep(e)
        if hint is None:
            shutil.rmtree(tmp, ignore_errors=True)
            for p in created:  # nearest first: each is empty once the one below it is gone
                with contextlib.suppress(OSError):
                    p.rmdir()
        elif hint:
            e.slimkit_hint = hint
        raise
    finally:
        os.close(fd)


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def check_positions(config, seqlen: int) -> None:
    """Refuse windows longer than the model's positions (an IndexError in OPT, silently wrong in
    rotary models)."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    if isinstance(limit, int) and 0 < limit < seqlen:
        raise SlimkitError(f"--seqlen {seqlen} is longer than this model's {limit} positions "
                           "(max_position_embeddings)")


def bytes_on_disk(folder: Path) -> int:
    """The bytes of the files under ``folder``, a file with several names (hard links: a
    checkpoint's link to an output shard) counted once; 0 when it does not exist."""
    if not folder.is_dir():
        return 0
    seen = {(st.st_dev, st.st_ino): st.st_size for st in (f.stat() for f in folder.rglob("*") if f.is_file())}
    return sum(seen.values())


def _copied_beside(name: str) -> bool:
    """A file of a model folder that the output may get a copy of: the tokenizer's and the
    configuration (not the weights, in any format, nor a README or an image)."""
    return name.endswith((".json", ".txt", ".model", ".tiktoken", ".jinja")) and not name.endswith(".index.json")


def hard_links_work(where: Path) -> bool:
    """Whether the file system of the folder ``where`` makes hard links (a --low-memory checkpoint
    links the output's record shards instead of copying them); tried in a temporary folder."""
    import tempfile
    try:
        with tempfile.TemporaryDirectory(dir=where, prefix=".slimkit-link-") as d:
            (Path(d) / "a").touch()
            os.link(Path(d) / "a", Path(d) / "b")
        return True
    except OSError:
        return False


def disk_need(model, *, nsamples: int, seqlen: int, placement: Placement, fit: RecipeFit,
              offload_activations: bool, eval_tokens: int | None, blocks=None, paired: bool = False,
              untie: bool = False, location: str | Path | None = None, links: bool = True) -> dict[str, int]:
    """At least the bytes a run has on disk at its peak, by part, when the output is written and the
    checkpoint not yet removed: the output model (an untied head in it too when a model-level stage
    unties it) and its state records (``fit``: ``check_recipe_fits``); the checkpoint, which
    holds every compressed block of a resident model and the records again (a streamed model's
    blocks and records are in the output's shards already: the checkpoint links the record shards,
    on a file system with hard links: ``links``; without, it copies them), the base weights that a
    fine-tuning recipe keeps for its adapters, and the inputs of the next block (two files for a moment,
    each with the dense model's inputs beside them when ``paired``); offloaded activations; the
    dense evaluation summary; the files copied beside the weights (the tokenizer and configuration
    files of the model's folder, or 16 MiB for a single file), the report and its plots. ``blocks``: a streamed
    model's block source."""
    hidden = model.get_input_embeddings().weight.shape[1]
    storage = torch.empty((), dtype=placement.storage).element_size()
    width = torch.empty((), dtype=placement.compute).element_size()
    layout = layout_for(model)
    block_params = [sum(p.numel() for p in b.parameters()) for b in layout.blocks(model)]
    params = sum(p.numel() for p in model.parameters())
    if blocks is not None:  # a streamed model holds one block: count the others
        params += (len(blocks) - len(block_params)) * block_params[0]
    if untie:
        params += model.get_input_embeddings().weight.numel()
    checkpoint = 2 * (2 if paired else 1) * nsamples * seqlen * hidden * width
    if blocks is None:  # resident: every compressed block and the records (streamed: the output's shards, linked)
        checkpoint += sum(block_params) * storage + fit.record_bytes + fit.finetune_bytes
    elif not links:
        checkpoint += fit.record_bytes
    beside = sum(f.stat().st_size for f in Path(location).iterdir() if f.is_file() and _copied_beside(f.name)) \
        if location is not None and Path(location).is_dir() else 16 * 2**20
    report = 2**18 + 2048 * fit.targets  # report.json, report.md, slimkit.json (a record per Linear), two plots
    return {"model": params * storage, "state records": fit.record_bytes, "checkpoint": checkpoint,
            "offloaded activations": 3 * nsamples * seqlen * hidden * width if offload_activations else 0,
            "other files": (eval_tokens or 0) * (hidden + 2) * 8 + beside + report}


def check_resources(model, *, nsamples: int, seqlen: int, out: Path, placement: Placement,
                    offload_activations: bool, eval_tokens: int | None, fit: RecipeFit, blocks=None,
                    partial: Path | None = None, paired: bool = False, untie: bool = False,
                    location: str | Path | None = None) -> None:
    """Refuse, before any work, a run that cannot fit: calibration activations against the memory
    available (or, offloaded, against the disk), the output against the free disk space."""
    hidden = model.get_input_embeddings().weight.shape[1]
    width = torch.empty((), dtype=placement.compute).element_size()
    acts = 3 * nsamples * seqlen * hidden * width  # the block's inputs, outputs and one working copy
    ids = nsamples * seqlen * 8
    where = next(p for p in [out, *out.parents] if p.exists())
    parts = disk_need(model, nsamples=nsamples, seqlen=seqlen, placement=placement, fit=fit,
                      offload_activations=offload_activations, eval_tokens=eval_tokens, blocks=blocks,
                      paired=paired, untie=untie, location=location, links=blocks is None or hard_links_work(where))
    held = bytes_on_disk(partial) if partial else 0  # what a resumed run holds already
    disk = sum(parts.values()) - held
    avail = available_memory()
    size = f"{nsamples} x {seqlen} calibration tokens (hidden size {hidden})"
    if avail is not None and placement.device.type == "cpu" and not offload_activations and acts + ids > avail:
        raise SlimkitError(f"{size} need about {_gib(acts + ids)} of activations and {_gib(avail)} of memory is "
                           "available: lower --nsamples or --seqlen, or pass --offload-activations")
    if avail is not None and ids > avail:
        raise SlimkitError(f"{size} need {_gib(ids)} for the token ids alone; {_gib(avail)} of memory is available")
    free = shutil.disk_usage(where).free
    if disk > free:
        what = ", ".join(f"{k} {_gib(v)}" for k, v in parts.items() if v)
        raise SlimkitError(f"not enough free disk space in {str(where)!r}: this run writes about {_gib(disk)} ({what}"
                           f"{f'; {_gib(held)} of it written already' if held else ''}), {_gib(free)} is free")


def compress(model: str, recipe: str | Recipe, out: str | Path, *, calib: str | torch.Tensor = "shakespeare",
             nsamples: int = 128, seqlen: int = 512, seed: int = 0, eval_data: str | None = "shakespeare:eval",
             eval_tokens: int = 16384, batch_size: int = 8, progress: bool = True,
             reference_cache: str | None = None, command: str | None = None, resume: bool = False,
             low_memory: bool = False, offload_activations: bool = False,
             device: str | torch.device = "auto", dtype: str | torch.dtype = "auto") -> dict:
    """Compress ``model`` with ``recipe`` into the Hugging Face folder ``out`` (fake-quantized
    weights that AutoModelForCausalLM loads) with report.json / report.md; returns the report.

    Progress is checkpointed block by block in a hidden folder beside ``out``; after a crash
    or a kill, the same call with ``resume=True`` continues from the last finished block and
    writes the same files an uninterrupted run would have.

    ``low_memory`` reads the blocks of a safetensors folder one at a time and writes the output
    block by block (peak memory independent of the number of blocks); ``offload_activations``
    keeps the calibration activations in memory-mapped files in the temporary folder.

    ``calib`` is a text source, or a LongTensor (N, S) of token ids (then ``nsamples`` and
    ``seqlen`` are its shape and no tokenizer is needed). ``device``: where each block computes
    (``auto``: the first CUDA device, else the CPU); ``dtype``: the storage dtype of the model and
    of the output (``auto``: the checkpoint's own). Blocks compute in that dtype on CUDA and in
    fp32 on a CPU; statistics and the OBS sweep are fp32 everywhere."""
    t0 = time.perf_counter()
    out_path = check_output_dir(out, model)
    partial = partial_dir(out_path)
    if partial.exists() and partial_in_use(partial):
        raise SlimkitError(f"another slimkit run is writing {str(out_path)!r} now (its temporary folder "
                           f"{str(partial)!r} is locked); wait for it or stop it")
    if partial.exists() and not resume:
        raise SlimkitError(f"an unfinished run of this output is in {str(partial)!r}: pass --resume to "
                           "continue it, or delete that folder")
    dist.setup()  # under torchrun: join the workers (each takes a share of the calibration data)
    if dist.active() and resume:
        raise SlimkitError("--resume is not supported with several workers yet")
    dist.barrier()  # every worker has checked the output before worker 0 creates its partial folder
    rec = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    resolve(model)  # fails fast on a missing path
    placement = Placement.make(device, resolve_dtype(dtype, model_config(model)))
    if placement.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(placement.device)
    given_ids = None
    if isinstance(calib, torch.Tensor):
        if calib.dim() != 2 or calib.dtype not in (torch.int64, torch.int32) or calib.numel() == 0:
            raise SlimkitError(f"calibration token ids must be a non-empty (N, S) integer tensor, got "
                               f"{tuple(calib.shape)} {calib.dtype}")
        given_ids = calib.long()
        nsamples, seqlen = map(int, given_ids.shape)
        calib = f"token ids {nsamples} x {seqlen}"
    if low_memory and rec.finetune is not None:
        raise SlimkitError("--low-memory cannot fine-tune adapters (that needs the whole model in memory)")
    if low_memory and dist.active():
        raise SlimkitError("--low-memory is not supported with several workers yet")
    torch.manual_seed(seed)
    need_tok = given_ids is None or eval_data is not None
    streamed = StreamedModel(model, with_tokenizer=need_tok, dtype=placement.storage) if low_memory else None
    if streamed is not None:
        m, tok, location, layout, source = streamed.model, streamed.tokenizer, streamed.location, streamed.layout, streamed
    else:
        m, tok, location = load_model(model, dtype=placement.storage, with_tokenizer=need_tok)
        layout = layout_for(m)
        source = ResidentBlocks(m, layout)
    fit = check_recipe_fits(source, rec, model_gqa(m.config))
    if fit.targets == 0:
        if not any(source.linears(i, source.peek(i)) for i in range(len(source))):
            kinds = sorted({type(mod).__name__ for mod in source.peek(0).modules()
                            if isinstance(getattr(mod, "weight", None), torch.Tensor) and mod.weight.dim() == 2})
            raise SlimkitError(f"unsupported architecture {layout.model_type!r}: its decoder blocks hold no nn.Linear "
                               f"layers (2-D weights in: {', '.join(kinds) or 'none'})")
        raise SlimkitError(f"recipe {rec.name!r} ignores every Linear of the model")
    for st in rec.model_stages:
        st.check_model(m, source, layout.model_type)
    check_positions(m.config, seqlen)
    tied = getattr(m.config.get_text_config(), "tie_word_embeddings", False)
    check_resources(m, nsamples=nsamples, seqlen=seqlen, out=out_path, placement=placement,
                    offload_activations=offload_activations, eval_tokens=eval_tokens if eval_data else None,
                    fit=fit, blocks=source if streamed is not None else None,
                    partial=partial if resume else None, paired=DENSE_CROSS in rec.needs,
                    untie=bool(rec.model_stages) and bool(tied), location=location)
    if given_ids is not None:
        vocab = m.get_input_embeddings().weight.shape[0]
        if int(given_ids.max()) >= vocab or int(given_ids.min()) < 0:
            raise SlimkitError(f"calibration token ids must be in [0, {vocab}) for this model")
        ids = given_ids
    else:
        ids = calibration_ids(calib, tok, nsamples, seqlen, seed)
    windows = evaluation_ids(eval_data, tok, seqlen, eval_tokens) if eval_data else None
    t_load = time.perf_counter() - t0
    if windows is not None and reference_cache:
        ReferenceCache(reference_cache, "").check_location()

    if dist.rank() != 0:  # a helper worker: statistics of its share, collectives; worker 0 writes
        transform_model(m, source, layout, rec, placement)
        compress_model(m, layout, rec, ids, batch_size=batch_size, progress=False, placement=placement)
        return {"worker": dist.rank()}
    records = _Records(keep_adapters=rec.finetune is not None, spill=low_memory)
    fingerprint = {
        "model": str(location), "model_files": files_digest(location), "recipe": rec.to_dict(),
        "calibration": {"source": calib, "nsamples": nsamples, "seqlen": seqlen, "seed": seed},
        "calibration_tokens": tensor_digest(ids), "batch_size": batch_size, "low_memory": low_memory,
        "placement": placement.describe(),
        # the same seed gives the same bytes only with the same number of threads (reduction order)
        "threads": torch.get_num_threads(),
        "versions": {"slimkit": __version__, "torch": torch.__version__},
    }
    ckpt = None if dist.active() else Checkpoint(partial / "checkpoint", fingerprint)
    with atomic_dir(out_path, reuse=resume, keep=ckpt.keep_message if ckpt else None) as tmp:
        resumed_from = ckpt.open(resume) if ckpt else 0
        reference = None  # the dense model's summary for the KL: made here, before any block changes
        if windows is not None:
            reference = dense_reference_for(model, windows, resident=None if streamed is not None else m,
                                            reference_cache=reference_cache, placement=placement, progress=progress)
        records.directory = tmp
        # after the dense reference (of the original model), before calibration
        transforms, reference = transform_model(m, source, layout, rec, placement, reference)
        result = compress_model(m, layout, rec, ids, batch_size=batch_size, progress=progress,
                                on_layer=records.on_layer, checkpoint=ckpt, on_block=records.on_block,
                                on_restore=records.on_restore, source=source,
                                after_block=(lambda i, b: streamed.write_block(i, b, tmp)) if streamed else None,
                                activations=str(tmp / ".activations") if offload_activations else None,
                                placement=placement)
        shutil.rmtree(tmp / ".activations", ignore_errors=True)
        finetune_report = None
        if rec.finetune is not None:
            ft = finetune_adapters(m, records.adapters, ids, rec.finetune, progress=progress, placement=placement)
            for name, a in ft.pop("adapters").items():
                records.state.tensors[f"{name}.L"], records.state.tensors[f"{name}.R"] = a["L"], a["R"]
            finetune_report = ft
            records.adapters.clear()
        report = {
            "slimkit_version": __version__, "model": model, "model_location": location,
            "model_type": layout.model_type, "recipe": rec.to_dict(),
            "calibration": {"source": calib, "nsamples": nsamples, "seqlen": seqlen, "seed": seed},
            "compression": result.to_dict(), "load_seconds": t_load,
            "compressed_params": sum(l.numel for l in result.layers),
            "peak_rss_compress_mb": peak_rss_mb(), "command": command, "resumed_from_block": resumed_from,
            "device": placement.describe() | {"peak_memory_mb": peak_device_memory_mb(placement.device)},
            "threads": torch.get_num_threads(),
        }
        if finetune_report is not None:
            report["finetune"] = finetune_report
        if transforms:
            report["transforms"] = transforms
        t = time.perf_counter()
        if streamed is not None:
            streamed.write_rest(tmp)  # the blocks are in their shards already
            del m, streamed
            m = None
        else:
            m.save_pretrained(tmp)
            if tok is not None:  # calibration given as token ids: no tokenizer was loaded
                tok.save_pretrained(tmp)
        records.state.save(tmp, {"format": "slimkit-fakequant", "version": 1, "slimkit_version": __version__,
                                 "recipe": rec.to_dict(), "source_model": model, "model_type": layout.model_type})
        report["save_seconds"] = time.perf_counter() - t
        if windows is not None:
            if m is None:  # low memory: evaluate what was written (loaded whole, like any user would)
                m = load_model(str(tmp), dtype=placement.storage, with_tokenizer=False)[0]
            report["eval"] = evaluate_against_dense(m, model, windows, reference, progress=progress,
                                                    placement=placement) | {"source": eval_data}
        report["peak_rss_total_mb"] = peak_rss_mb()
        if dist.active():
            report["workers"] = dist.world_size()
        write_report(report, tmp)
        if ckpt:
            ckpt.remove()
    return report


def transform_model(m, source, layout: ModelLayout, rec: Recipe, placement: Placement,
                    reference: DenseReference | None = None) -> tuple[dict, DenseReference | None]:
    """Run the recipe's model-level stages (rotate) on the model: its shell now, its blocks through
    the block source (resident: now; streamed: as each is read). What each did, and the dense
    reference made to follow the head they changed."""
    done = {}
    for st in rec.model_stages:
        t = time.perf_counter()
        res = st.transform(m, source, layout.model_type, device=placement.device)
        done[st.name] = res.info | {"seconds": time.perf_counter() - t}
        if reference is not None and res.head_map is not None:
            # resident: check on a forward that the logits are still the head of the last hidden
            # state; streamed (no forward without the blocks): the head that the reference checked
            head = linear_head(m, placement) if source.resident else _plain_head(m)
            if head is None:
                raise SlimkitError(f"after {st.name} the model's logits are no longer its head applied to its "
                                   "last hidden state")
            reference = reference.with_head_map(res.head_map, head.digest())
    return done, reference


def _plain_head(m) -> LinearHead | None:
    head = m.get_output_embeddings() if hasattr(m, "get_output_embeddings") else None
    return LinearHead(head.weight, head.bias) if type(head) is torch.nn.Linear else None


class _Records:
    """What a run keeps of every compressed Linear: its state record (grids, masks, adapters)
    and, when the recipe fine-tunes, the adapters with their base weight; and how that goes
    into and comes back out of a checkpoint."""

    def __init__(self, keep_adapters: bool, spill: bool = False):
        self.state = StateRecorder()
        self.spill = spill  # write each block's records to a shard in ``directory`` and forget them
        self.directory = None
        self.keep_adapters = keep_adapters
        self.adapters: dict[str, dict] = {}

    def on_layer(self, state) -> None:
        self.state(state)
        if self.keep_adapters and state.L is not None:  # kept on the CPU until fine-tuning
            self.adapters[state.name] = {"weight": state.weight.cpu(), "L": state.L.cpu(), "R": state.R.cpu(),
                                         "bits": state.adapter_bits, "group": state.adapter_group}

    def on_block(self, index: int) -> tuple[dict, dict]:
        tensors, layers = self.state.take_new()
        meta = {"layers": layers, "adapters": {}}
        for name in layers:
            if name in self.adapters:
                a = self.adapters[name]
                meta["adapters"][name] = {"bits": a["bits"], "group": a["group"]}
                if f"{name}.weight" not in tensors:  # an unquantized base is in the state record already
                    tensors[f"finetune::{name}::weight"] = a["weight"]  # (and so are L and R)
        if self.spill:  # the checkpoint links the shard instead of writing the records again
            return self.state.spill(self.directory, index, tensors), meta
        return tensors, meta

    def on_restore(self, index: int, tensors: dict, meta: dict) -> None:
        for name, a in meta["adapters"].items():
            base = tensors.pop(f"finetune::{name}::weight", None)
            self.adapters[name] = {"weight": tensors[f"{name}.weight"] if base is None else base,
                                   "L": tensors[f"{name}.L"], "R": tensors[f"{name}.R"]} | a
        self.state.add(tensors, meta["layers"])
        self.state.take_new()
        if self.spill:  # its shard is there already, linked from the checkpoint: kept, not written again
            self.state.spill(self.directory, index, tensors, keep=True)


def dense_reference_for(dense_spec: str, windows: torch.Tensor, *, resident=None, reference_cache: str | None = None,
                        placement: Placement | None = None, progress: bool = True) -> DenseReference | None:
    """The dense model's summary of ``windows`` for the head-moment KL (eval.perplexity), from
    ``reference_cache`` when it holds it; computed with ``resident`` (the dense model, before any
    block is compressed) or else with ``dense_spec`` loaded for the duration. None when the
    model's logits are not a plain linear head: its evaluation then runs paired."""
    storage = placement.storage if placement else None  # the head's digest depends on it: so does the key
    cache = ReferenceCache(reference_cache, windows_key(windows, f"{resolve(dense_spec)[1]}:{storage}")) \
        if reference_cache else None
    dense = resident if resident is not None else \
        load_model(dense_spec, dtype=placement.storage if placement else "auto", with_tokenizer=False)[0]
    head = linear_head(dense, placement)
    if head is None:
        log.warning("this model's logits are not its output head applied to the last hidden state: the KL "
                    "will be computed with the dense model loaded beside the compressed one%s",
                    " (--reference-cache is not used)" if cache is not None else "")
        return None
    return reference_summary(lambda: dense, windows, head, cache=cache, progress=progress, placement=placement)


def evaluate_against_dense(model, dense_spec: str, windows: torch.Tensor, reference: DenseReference | None = None, *,
                           progress: bool = True, placement: Placement | None = None) -> dict:
    """Perplexity of ``model`` and KL to the dense model ``dense_spec`` on ``windows``, computed
    on ``placement`` (default: the CPU in the models' dtype): from ``reference`` (the dense
    model's summary) when given, else with the dense model loaded beside it (paired)."""
    t = time.perf_counter()
    if reference is None:
        reference = load_model(dense_spec, dtype=placement.storage if placement else "auto", with_tokenizer=False)[0]
    res = evaluate(model, windows, reference, progress=progress, desc="eval (compressed vs dense)",
                   placement=placement)
    out = res.to_dict() | {"seconds": time.perf_counter() - t}
    if isinstance(reference, DenseReference):
        out |= {"reference_seconds": reference.seconds, "reference_cache": reference.meta.get("cache"),
                "reference_bytes": reference.nbytes()}
    return out


def evaluate_model(model: str, data: str | None = None, *, reference: str | None = None,
                   seqlen: int = 512, max_tokens: int | None = 16384, progress: bool = True,
                   device: str | torch.device = "auto", dtype: str | torch.dtype = "auto",
                   tasks: str | list[str] | None = None, num_fewshot: int | None = None,
                   limit: int | float | None = None, batch_size: int = 8,
                   include_path: str | Path | list[str | Path] | None = None) -> dict:
    """Perplexity of ``model`` on ``data`` (and KL to ``reference``), and/or lm-evaluation-harness
    ``tasks`` (names, or one comma-separated string); each block computes on ``device``.

    ``data=None`` means shakespeare:eval when no ``tasks`` are given; with ``tasks``, perplexity
    runs only when ``data`` or ``reference`` is given (tasks are what was asked for, and a
    perplexity pass costs as much as a small task). ``num_fewshot``, ``limit`` (documents per
    task, or a fraction below 1) and ``batch_size`` go to lm-eval; ``include_path``: folders of
    lm-eval task YAML files (local data, offline). The built-in task
    ``slimkit_shakespeare_next_line`` is always known. lm-eval's results are under ``tasks``,
    its task and metric names unchanged. A packed folder (``slimkit export --format native``)
    is loaded with ``slimkit.load`` and computes in fp32, as its runtime does."""
    from .models.loading import load_tokenizer
    from .pack.native import is_native

    names = manager = None
    if tasks is None:
        given = [k for k, v in (("--num-fewshot", num_fewshot), ("--limit", limit), ("--include-path", include_path))
                 if v is not None]
        if given:
            raise SlimkitError(f"{', '.join(given)} appl{'y' if len(given) > 1 else 'ies'} only with --tasks")
    else:
        from .eval.tasks import TaskError, parse_tasks, require_lm_eval, task_manager

        require_lm_eval()  # before any work: one line with the pip command
        names = parse_tasks(tasks)
        if num_fewshot is not None and (not isinstance(num_fewshot, int) or num_fewshot < 0):
            raise TaskError(f"--num-fewshot must be a non-negative integer, got {num_fewshot!r}")
        if limit is not None:
            if not is_number(limit) or not limit > 0:
                raise TaskError(f"--limit must be positive (documents per task, or a fraction below 1), got {limit!r}")
            if limit >= 1:
                if limit != int(limit):
                    raise TaskError(f"--limit of 1 or more is a number of documents: a whole number, got {limit!r}")
                limit = int(limit)
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise TaskError(f"--batch-size must be a positive integer, got {batch_size!r}")
    native = is_native(Path(model).expanduser())
    if not native:
        resolve(model)  # fails fast on a missing path
    if names is not None:
        manager = task_manager(names, include_path)  # unknown names: one line, before the model loads
    if data is None and (names is None or reference is not None):
        data = "shakespeare:eval"
    storage = torch.float32 if native else resolve_dtype(dtype, model_config(model))
    placement = Placement.make(device, storage)

    def load(with_tokenizer: bool = True):
        if native:  # already on the device, in fp32
            from .pack import load as load_packed
            return load_packed(model, device=placement.device), load_tokenizer(model) if with_tokenizer else None
        return load_model(model, dtype=storage, with_tokenizer=with_tokenizer)[:2]

    m, tok = load()
    out = {"model": model, "reference": reference, "device": placement.describe()}
    if data is not None:
        check_positions(m.config, seqlen)
        windows = evaluation_ids(data, tok, seqlen, max_tokens)
        ref = None
        if reference:
            head = linear_head(m, placement)
            if head is not None:  # the reference alone first, then the model: never both in memory
                head = head.detached()
                del m
                ref = reference_summary(lambda: load_model(reference, dtype=storage, with_tokenizer=False)[0],
                                        windows, head, progress=progress, placement=placement)
                m = load(with_tokenizer=False)[0]
            else:
                ref = load_model(reference, dtype=storage, with_tokenizer=False)[0]
        res = evaluate(m, windows, ref, progress=progress, placement=placement)
        del ref
        out |= res.to_dict() | {"source": data}
    if names is not None:
        from .calib.device import placed
        from .eval.tasks import run_tasks

        with placed(placement, m):  # lm-eval computes where the model's parameters are
            out |= run_tasks(m, tok, names, manager, num_fewshot=num_fewshot, limit=limit, batch_size=batch_size,
                             progress=progress)
    return out
