"""A Linear that computes from packed codes (on the CPU or a CUDA device), and loading a packed
folder as a model without materialising its dense weights.

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

On a CUDA device (``load(..., device="cuda")``) the int4 layers use PyTorch's CUDA int4 kernel
(tinygemm: ``_convert_weight_to_int4pack`` / ``_weight_int4pack_mm``, NVIDIA compute capability
>= 8.0 only) with the same scales-and-zeros tensor as the CPU kernel; the weight is packed from
(N, K/2) bytes with the EVEN column in the high nibble (torch's CUDA convention; the reverse of
this module's ``qweight``; the CPU kernel takes unpacked int32 codes). Each CUDA-packed layer is checked once at load against its exact dequantized weight
and falls back to the exact path if they disagree. The int8 kernel is CPU-only: on CUDA 8-bit
per-channel layers (and ``head="int8"``) take the exact dequantize path. ``kernel_max_tokens`` is
the CPU crossover, not tuned for CUDA. :func:`kernel_ops` is the one place that picks the device's
kernels.
"""
from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..models.layout import replace_output_head
from .source import LayerRecord, PackError, expand_groups, first_line

log = logging.getLogger(__name__)

KERNEL_GROUPS = (256, 128, 64, 32)
KERNEL_MAX_TOKENS = 16  # int4 kernel vs dequantize + dense crossed between 16 and 32 tokens (1 thread)


def _int4_kernel_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and \
        hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")


def _int8_kernel_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int8pack_mm")


def _cuda_int4_kernel_available(device: torch.device) -> bool:
    """torch has the CUDA int4 ops and ``device`` can run them: tinygemm is built for NVIDIA
    compute capability >= 8.0 only (older devices run an empty kernel rather than raise); ROCm's
    tile layout differs and is not used here."""
    if not (hasattr(torch.ops.aten, "_convert_weight_to_int4pack") and hasattr(torch.ops.aten, "_weight_int4pack_mm")):
        return False
    if getattr(torch.version, "hip", None) or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= (8, 0)


def _pack_int4_cpu(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) codes in 0..15 -> the CPU kernel's packed weight (it takes int32 codes)."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 2)


def cuda_int4_bytes(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) codes in 0..15 -> (N, K/2) uint8 with column 2j in the HIGH nibble and 2j+1 in the
    low one: the input ``_convert_weight_to_int4pack`` takes on CUDA (torch's own tests build it
    as ``out[:, ::2] << 4 | out[:, 1::2]``). The reverse of this module's ``qweight`` order."""
    c = codes.to(torch.uint8)
    return ((c[:, 0::2] << 4) | c[:, 1::2]).contiguous()


def cuda_inner_k_tiles(K: int) -> int:
    """The widest tinygemm inner-k tiling (8, 4 or 2 tiles of 16) that divides K (K % 32 == 0)."""
    return next(t for t in (8, 4, 2) if K % (16 * t) == 0)


def _pack_int4_cuda(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) codes in 0..15 on a CUDA device -> (N/8, K/(16 t), 32, t/2) int32 tinygemm tiles."""
    return torch.ops.aten._convert_weight_to_int4pack(cuda_int4_bytes(codes), cuda_inner_k_tiles(codes.shape[1]))


class KernelOps(NamedTuple):
    """The kernels of one device type. int4 (None when absent): ``pack`` (N, K) codes (on that
    device) into its weight format; ``mm(x_bf16 (T, K) contiguous, packed, group,
    scales_and_zeros (K/group, N, 2) bf16)`` -> (T, N) bf16, with W = (q - 8) s + z; ``verify``:
    check each packed layer against its exact weight at build time. ``int8``: the int8 kernel
    (CPU only) may be used."""

    device_type: str
    pack: Callable[[torch.Tensor], torch.Tensor] | None
    mm: Callable[..., torch.Tensor] | None
    verify: bool
    int8: bool


@functools.lru_cache(maxsize=None)
def _kernel_ops(device_type: str, index: int | None) -> KernelOps | None:
    if device_type == "cpu":
        int4 = _int4_kernel_available()
        return KernelOps("cpu", _pack_int4_cpu if int4 else None,
                         torch.ops.aten._weight_int4pack_mm_for_cpu if int4 else None, False, _int8_kernel_available())
    if device_type == "cuda" and _cuda_int4_kernel_available(torch.device("cuda", index or 0)):
        return KernelOps("cuda", _pack_int4_cuda, torch.ops.aten._weight_int4pack_mm, True, False)
    return None


def kernel_ops(device: torch.device | str = "cpu") -> KernelOps | None:
    """The kernels PackedLinear uses on ``device``, or None (every layer then takes the exact
    dequantize path): the one place that chooses between the CPU and the CUDA kernels."""
    device = torch.device(device)
    return _kernel_ops(device.type, device.index)


INT4_CHECK_REL_TOL = 0.05  # bf16 scales and activations: ~1% of the output's norm; a wrong layout: ~100%


class PackedLinear(nn.Module):
    """y = x W^T + b + (x L) R, with W held as integer codes plus per-(row, group) scale and zero."""

    def __init__(self, rec: LayerRecord, mode: str = "auto", kernel_max_tokens: int = KERNEL_MAX_TOKENS,
                 device: torch.device | str = "cpu"):
        """``device``: where the layer will run; the kernel's packed weight is built for (and on)
        it, the other buffers stay on the CPU until the module is moved (``load`` moves the whole
        model). The kernel runs only on inputs on a device of that type: after a ``.to()`` to
        another device type the layer takes the exact dequantize path."""
        super().__init__()
        if mode not in ("auto", "kernel", "dequant"):
            raise ValueError(f"mode must be auto, kernel or dequant, got {mode!r}")
        N, K = rec.shape
        self.in_features, self.out_features = K, N
        self.mode, self.kernel_max_tokens = mode, kernel_max_tokens
        self.group_size = rec.group_size
        t = rec.tensors
        self.kernel = None
        self.kernel_device = None  # the device type the kernel's packed weight was built for
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
            self._build_kernel(codes, torch.device(device))
        else:
            self.register_buffer("qweight", None)
            self.register_buffer("weight_fp", rec.base_weight().float().contiguous())
        self.register_buffer("bias", None if rec.bias is None else rec.bias.float())
        self.register_buffer("L", t["L"].float().contiguous() if rec.has_adapters else None)
        self.register_buffer("R", t["R"].float().contiguous() if rec.has_adapters else None)

    # -- kernels -------------------------------------------------------------------------------
    def _build_kernel(self, codes: torch.Tensor, device: torch.device) -> None:
        N, K = self.out_features, self.in_features
        G = self.scale.shape[1]
        if self.mode == "dequant":
            return
        ops = kernel_ops(device)
        if ops is None:
            return
        # N % 16 and groups of 32..256 dividing K (so K % 32 == 0) suit both the CPU kernel and
        # tinygemm (N % 8, K % (16 * inner k-tiles), groups 32/64/128/256)
        if self.bits == 4 and ops.mm is not None and N % 16 == 0:
            g = self.group_size or K
            gk = next((c for c in KERNEL_GROUPS if g % c == 0 and K % c == 0), None)
            if gk is not None:
                try:
                    codes = codes.to(device)
                    packed = ops.pack(codes)
                    per = expand_groups(self.scale, K, self.group_size)[:, ::gk]  # (N, K/gk)
                    zer = expand_groups(self.zero, K, self.group_size)[:, ::gk]
                    sz = torch.stack([per, (8 - zer) * per], -1).transpose(0, 1).contiguous()  # (K/gk, N, 2)
                    sz = sz.to(torch.bfloat16).to(device)
                    ops.mm(torch.zeros(1, K, dtype=torch.bfloat16, device=device), packed, gk, sz)
                    if ops.verify:
                        self._check_int4(ops, codes, packed, gk, sz)
                except RuntimeError as e:
                    log.debug("int4 kernel unavailable for a (%d, %d) layer: %s", N, K, first_line(e))
                else:
                    self.register_buffer("k_weight", packed)
                    self.register_buffer("k_scales", sz)
                    self.kernel, self.k_group, self.kernel_device = "int4", gk, device.type
                    return
        if self.bits == 8 and G == 1 and ops.int8:
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
            self.kernel, self.kernel_device = "int8", device.type

    def _check_int4(self, ops: KernelOps, codes: torch.Tensor, packed, gk: int, sz) -> None:
        """Raise RuntimeError unless ``ops.mm`` on ``packed`` reproduces x W^T for the layer's exact
        base weight W = (q - zero) * scale (bf16 tolerance), computed on the codes' device."""
        K = self.in_features
        dev = codes.device
        W = (codes.float() - expand_groups(self.zero.to(dev), K, self.group_size)) * \
            expand_groups(self.scale.to(dev), K, self.group_size)
        gen = torch.Generator(device=dev).manual_seed(0)
        x = torch.randn(4, K, generator=gen, device=dev).to(torch.bfloat16)
        want = x.float() @ W.T
        err = float(torch.linalg.vector_norm(ops.mm(x, packed, gk, sz).float() - want))
        ref = float(torch.linalg.vector_norm(want))
        if not err <= INT4_CHECK_REL_TOL * ref + 1e-6:
            raise RuntimeError(f"the {ops.device_type} int4 kernel disagrees with the exact weight "
                               f"(relative error {err / max(ref, 1e-30):.3g})")

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
        use_kernel = self.kernel is not None and x2.device.type == self.kernel_device and \
            (self.mode == "kernel" or x2.shape[0] <= self.kernel_max_tokens)
        if use_kernel:
            xk = x2 if self.input_scale is None else x2 * self.input_scale
            xb = xk.to(torch.bfloat16)
            if self.kernel == "int4":
                y = kernel_ops(x2.device).mm(xb.contiguous(), self.k_weight, self.k_group, self.k_scales).float()
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


def int8_head(weight: torch.Tensor, mode: str = "auto", device: torch.device | str = "cpu") -> PackedLinear:
    """The output head quantized per row, symmetric 8-bit (codes - 128) * absmax / 127, as a
    PackedLinear (the int8 kernel at decode, exact dequantization for longer inputs). Lossy:
    callers that use it must report its cost (benchmarks/export.py measures the KL it adds)."""
    W = weight.detach().float()
    scale = (W.abs().amax(1, keepdim=True) / 127).clamp_min(1e-12)  # (N, 1)
    codes = (torch.round(W / scale) + 128).clamp(1, 255).to(torch.uint8)
    rec = LayerRecord("lm_head", {"quant": {"bits": 8, "group_size": None}},
                      {"codes": codes, "scale": scale, "zero": torch.full_like(scale, 128.0)}, W)
    return PackedLinear(rec, mode=mode, device=device)


def load(directory: str | Path, runtime: str = "packed", mode: str = "auto", verify: bool = True,
         head: str = "exact", device: str | torch.device = "cpu"):
    """Load a slimkit folder as a causal LM in eval mode.

    A packed folder (``slimkit export --format native``): ``runtime="packed"`` puts a
    :class:`PackedLinear` in place of every compressed Linear (no dense copy of those weights);
    ``runtime="dense"`` rebuilds the fake-quantized fp32 weights, bit for bit equal to the folder
    the export came from. A fake-quantized slimkit folder or any HF folder loads as it is.
    ``head="int8"`` (packed runtime) also quantizes the output head per row to 8 bits at load
    time: the largest single matmul of a small model's decode step, NOT part of the compressed
    model and not exact (its cost in KL is measured by benchmarks/export.py).

    ``device`` (``cpu``, ``auto``, ``cuda``, ``cuda:N``; see calib.device.resolve_device): where
    the returned model lives, in fp32. The folder is read and decoded on the CPU; on a CUDA
    device the packed runtime's int4 layers are packed for the CUDA kernel (see the module
    docstring). Asking for CUDA where torch sees none raises a one-line SlimkitError."""
    if head not in ("exact", "int8"):
        raise ValueError(f"head must be exact or int8, got {head!r}")
    from ..calib.device import resolve_device
    from .native import decode_all, is_native, read_native

    dev = resolve_device(device)
    d = Path(directory).expanduser()
    if not is_native(d):
        from ..models import load_model
        return load_model(str(d), dtype=torch.float32, with_tokenizer=False)[0].to(dev)
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
            _set_module(model, name, PackedLinear(rec, mode=mode, device=dev))
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
        replace_output_head(model, int8_head(out_emb.weight, mode, dev))  # no longer the embedding matrix
    model.config.use_cache = True  # the fake-quant folder was saved with use_cache off (calibration)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.use_cache = True
    model.to(dev)
    model.eval()
    model.requires_grad_(False)
    return model
