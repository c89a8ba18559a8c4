"""A Linear that computes from packed codes on the CPU, and loading a packed folder as a model
without materialising its dense weights.

Measured on the 2-core CPU this project runs on (torch 2.13, 1 thread, the 210 Linears of
SmolLM2-135M in turn, so the weights do not sit in cache): PyTorch's int4 kernel
(``_weight_int4pack_mm_for_cpu``) with **fp32** activations is ~70x SLOWER than a dense fp32
matmul (it has no vectorised fp32 path); with **bf16** activations it is ~2.6x faster than dense
fp32 at one token, and ~1.4x slower at 64 tokens than dequantizing + dense (the crossover lies between
16 and 32 tokens). So:

- few tokens (decode, ``<= kernel_max_tokens``): the int4 kernel on bf16 activations (per-group
  scales and zeros folded as (q - 8) s + (8 - z) s), or the int8 kernel for 8-bit per-channel
  grids (asymmetric zero points as a rank-1 correction), output cast back to fp32;
- many tokens (prefill), or shapes / grids the kernels cannot take (N not a multiple of 16, group
  sizes outside 32..256, ragged groups, mixed per-group widths, other bit-widths): dequantize THIS
  layer's codes to fp32 ((q - zero) * scale, exactly as the fake-quantized model holds them) and
  run a dense matmul; the dense weight lives only for the call.
- adapters: two thin matmuls, (x L) R.

``mode="dequant"`` forces the exact fp32 path (equal to the fake-quantized model up to matmul
summation order); ``mode="kernel"`` uses a kernel whenever one applies.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .source import LayerRecord, PackError, expand_groups, first_line

log = logging.getLogger(__name__)

KERNEL_GROUPS = (256, 128, 64, 32)
KERNEL_MAX_TOKENS = 16  # int4 kernel vs dequantize + dense crossed between 16 and 32 tokens (1 thread)


def _int4_kernel_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and \
        hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")


def _int8_kernel_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int8pack_mm")


class PackedLinear(nn.Module):
    """y = x W^T + b + (x L) R, with W held as integer codes plus per-(row, group) scale and zero."""

    def __init__(self, rec: LayerRecord, mode: str = "auto", kernel_max_tokens: int = KERNEL_MAX_TOKENS):
        super().__init__()
        if mode not in ("auto", "kernel", "dequant"):
            raise ValueError(f"mode must be auto, kernel or dequant, got {mode!r}")
        N, K = rec.shape
        self.in_features, self.out_features = K, N
        self.mode, self.kernel_max_tokens = mode, kernel_max_tokens
        self.group_size = rec.group_size
        t = rec.tensors
        self.kernel = None
        self.bits = None
        if "codes" in t:
            colbits = rec.column_bits()
            uniform = bool((colbits == colbits[0]).all())
            self.bits = int(colbits[0]) if uniform else None
            codes = t["codes"]
            if self.bits == 4 and K % 2 == 0:  # two codes per byte, low nibble first
                self.register_buffer("qweight", (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous())
                self.nibbles = True
            else:
                self.register_buffer("qweight", codes.contiguous())
                self.nibbles = False
            self.register_buffer("scale", t["scale"].float().contiguous())  # (N, G)
            self.register_buffer("zero", t["zero"].float().contiguous())  # (N, G)
            self.register_buffer("input_scale", t["input_scale"].float() if "input_scale" in t else None)
            self.register_buffer("weight_fp", None)
            self._build_kernel(codes)
        else:
            self.register_buffer("qweight", None)
            self.register_buffer("weight_fp", rec.base_weight().float().contiguous())
        self.register_buffer("bias", None if rec.bias is None else rec.bias.float())
        self.register_buffer("L", t["L"].float().contiguous() if rec.has_adapters else None)
        self.register_buffer("R", t["R"].float().contiguous() if rec.has_adapters else None)

    # -- kernels -------------------------------------------------------------------------------
    def _build_kernel(self, codes: torch.Tensor) -> None:
        N, K = self.out_features, self.in_features
        G = self.scale.shape[1]
        if self.mode == "dequant":
            return
        if self.bits == 4 and _int4_kernel_available() and N % 16 == 0:
            g = self.group_size or K
            gk = next((c for c in KERNEL_GROUPS if g % c == 0 and K % c == 0), None)
            if gk is not None:
                try:
                    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 2)
                    per = expand_groups(self.scale, K, self.group_size)[:, ::gk]  # (N, K/gk)
                    zer = expand_groups(self.zero, K, self.group_size)[:, ::gk]
                    sz = torch.stack([per, (8 - zer) * per], -1).transpose(0, 1).contiguous()  # (K/gk, N, 2)
                    sz = sz.to(torch.bfloat16)
                    torch.ops.aten._weight_int4pack_mm_for_cpu(torch.zeros(1, K, dtype=torch.bfloat16), packed, gk, sz)
                except RuntimeError as e:
                    log.debug("int4 kernel unavailable for a (%d, %d) layer: %s", N, K, first_line(e))
                else:
                    self.register_buffer("k_weight", packed)
                    self.register_buffer("k_scales", sz)
                    self.kernel, self.k_group = "int4", gk
                    return
        if self.bits == 8 and G == 1 and _int8_kernel_available():
            w8 = (codes.to(torch.int16) - 128).to(torch.int8).contiguous()  # signed codes
            s = self.scale[:, 0]
            corr = s * (128 - self.zero[:, 0])  # y += sum(x) * s (128 - z)
            try:
                torch.ops.aten._weight_int8pack_mm(torch.zeros(1, K, dtype=torch.bfloat16), w8, s.to(torch.bfloat16))
            except RuntimeError as e:
                log.debug("int8 kernel unavailable: %s", first_line(e))
                return
            self.register_buffer("k_weight", w8)
            self.register_buffer("k_scales", s.to(torch.bfloat16))
            self.register_buffer("k_corr", corr if bool((corr != 0).any()) else None)
            self.kernel = "int8"

    def dequantize(self) -> torch.Tensor:
        """The base weight (out, in) in fp32, computed as the fake-quantized model holds it."""
        if self.qweight is None:
            return self.weight_fp
        q = self.qweight
        if self.nibbles:
            q = torch.stack([q & 15, q >> 4], -1).reshape(self.out_features, self.in_features)
        N, K = self.out_features, self.in_features
        g = self.group_size or K
        if K % g == 0:  # per-group broadcast: no (out, in) copies of the scales and zeros
            W = ((q.view(N, K // g, g).float() - self.zero[..., None]) * self.scale[..., None]).view(N, K)
        else:
            W = (q.float() - expand_groups(self.zero, K, g)) * expand_groups(self.scale, K, g)
        if self.input_scale is not None:
            W = W * self.input_scale[None, :]
        return W

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # (T, K)
        use_kernel = self.kernel is not None and (self.mode == "kernel" or x2.shape[0] <= self.kernel_max_tokens)
        if use_kernel:
            xk = x2 if self.input_scale is None else x2 * self.input_scale
            xb = xk.to(torch.bfloat16)
            if self.kernel == "int4":
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, self.k_weight, self.k_group, self.k_scales).float()
            else:
                y = torch.ops.aten._weight_int8pack_mm(xb, self.k_weight, self.k_scales).float()
                if self.k_corr is not None:
                    y = y + xk.sum(-1, keepdim=True) * self.k_corr
            if self.bias is not None:
                y = y + self.bias
        else:
            y = F.linear(x2.float(), self.dequantize(), self.bias)
        if self.L is not None:
            y = y + (x2.float() @ self.L) @ self.R  # two thin matmuls: (T, r), (T, N)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        what = f"{self.bits}-bit" if self.bits else ("mixed-bit" if self.qweight is not None else "float")
        r = f", rank={self.L.shape[1]}" if self.L is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, {what}, "
                f"group_size={self.group_size}, kernel={self.kernel}{r}")


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _empty_model(directory: Path):
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(directory))
    except Exception as e:
        raise PackError(f"cannot read the config of {str(directory)!r}: {first_line(e)}") from None
    with init_empty_weights(include_buffers=False):  # parameters on meta, rotary buffers computed on CPU
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model


def int8_head(weight: torch.Tensor, mode: str = "auto") -> PackedLinear:
    """The output head quantized per row, symmetric 8-bit (codes - 128) * absmax / 127, as a
    PackedLinear (the int8 kernel at decode, exact dequantization for longer inputs). Lossy:
    callers that use it must report its cost (benchmarks/export.py measures the KL it adds)."""
    W = weight.detach().float()
    scale = (W.abs().amax(1, keepdim=True) / 127).clamp_min(1e-12)  # (N, 1)
    codes = (torch.round(W / scale) + 128).clamp(1, 255).to(torch.uint8)
    rec = LayerRecord("lm_head", {"quant": {"bits": 8, "group_size": None}},
                      {"codes": codes, "scale": scale, "zero": torch.full_like(scale, 128.0)}, W)
    return PackedLinear(rec, mode=mode)


def load(directory: str | Path, runtime: str = "packed", mode: str = "auto", verify: bool = True,
         head: str = "exact"):
    """Load a slimkit folder as a causal LM in eval mode.

    A packed folder (``slimkit export --format native``): ``runtime="packed"`` puts a
    :class:`PackedLinear` in place of every compressed Linear (no dense copy of those weights);
    ``runtime="dense"`` rebuilds the fake-quantized fp32 weights, bit for bit equal to the folder
    the export came from. A fake-quantized slimkit folder or any HF folder loads as it is.
    ``head="int8"`` (packed runtime) also quantizes the output head per row to 8 bits at load
    time: the largest single matmul of a small model's decode step, NOT part of the compressed
    model and not exact (its cost in KL is measured by benchmarks/export.py)."""
    if head not in ("exact", "int8"):
        raise ValueError(f"head must be exact or int8, got {head!r}")
    from .native import decode_all, is_native, read_native

    d = Path(directory).expanduser()
    if not is_native(d):
        from ..models import load_model
        return load_model(str(d), with_tokenizer=False)[0]
    if runtime not in ("packed", "dense"):
        raise ValueError(f"runtime must be packed or dense, got {runtime!r}")
    manifest, stored = read_native(d, verify=verify)
    layers, dense = decode_all(manifest, stored, effective=runtime == "dense")  # packed: no dense copy
    del stored
    model = _empty_model(d)
    for name, rec in layers.items():
        rec.bias = dense.get(name + ".bias")
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise PackError(f"{name!r} in the manifest is not a module of the model in {str(d)!r}") from None
        if tuple(old.weight.shape) != rec.shape:
            raise PackError(f"{name}: stored shape {rec.shape} != the model's {tuple(old.weight.shape)}")
        if runtime == "packed":
            dense.pop(name + ".bias", None)
            _set_module(model, name, PackedLinear(rec, mode=mode))
        else:
            dense[name + ".weight"] = rec.effective
    try:
        model.load_state_dict(dense, strict=False, assign=True)
    except RuntimeError as e:
        raise PackError(f"stored tensors do not fit the model in {str(d)!r}: {first_line(e)}") from None
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if missing:
        raise PackError(f"{str(d)!r} lacks {len(missing)} model tensors, e.g. {missing[0]!r}")
    if head == "int8" and runtime == "packed":
        out_emb = model.get_output_embeddings()
        if out_emb is None or not isinstance(out_emb, nn.Linear) or out_emb.bias is not None:
            raise PackError(f"{str(d)!r}: the model has no bias-free Linear output head to quantize")
        model.config.tie_word_embeddings = False  # the head is no longer the embedding matrix
        model.set_output_embeddings(int8_head(out_emb.weight, mode))
    model.config.use_cache = True  # the fake-quant folder was saved with use_cache off (calibration)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.use_cache = True
    model.eval()
    model.requires_grad_(False)
    return model
