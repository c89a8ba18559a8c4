"""The one device/dtype seam: where blocks compute, in which dtype, and how they get there.

The model's weights stay where they are stored (CPU memory, or memory-mapped files) in the
model's own dtype. Each decoder block is moved onto the compute device for its statistics
forward, its stages and its probe forward, then moved back (sequential onloading). On a CUDA
device blocks compute in the model's dtype; on a CPU they compute in fp32 (CPUs without
bf16/fp16 arithmetic run such matmuls hundreds of times slower), so a bf16 block is upcast
while it is worked on and cast back. Statistics, Hessians and the OBS sweep are fp32 always.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import SlimkitError

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
          "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """``auto``: the first CUDA device torch sees, else the CPU; ``cpu``; ``cuda``; ``cuda:N``."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise SlimkitError(f"device {spec!r}: torch sees no CUDA device here (use --device cpu or auto)")
        index = 0 if spec == "cuda" else spec[5:]
        if not str(index).isdigit() or int(index) >= torch.cuda.device_count():
            raise SlimkitError(f"device {spec!r}: torch sees {torch.cuda.device_count()} CUDA device(s)")
        return torch.device(f"cuda:{int(index)}")
    raise SlimkitError(f"unknown device {spec!r}; use auto, cpu, cuda or cuda:N")


def config_dtype(config) -> torch.dtype:
    """The dtype a checkpoint declares (``torch_dtype`` / ``dtype`` in config.json); fp32 if none."""
    for attr in ("dtype", "torch_dtype"):
        d = getattr(config, attr, None)
        if isinstance(d, str):
            d = DTYPES.get(d.removeprefix("torch."))
        if isinstance(d, torch.dtype) and d in (torch.bfloat16, torch.float16, torch.float32):
            return d
    return torch.float32


def resolve_dtype(spec: str | torch.dtype | None, config=None) -> torch.dtype:
    """``auto`` (or None): the checkpoint's own dtype; else bfloat16 / float16 / float32."""
    if isinstance(spec, torch.dtype):
        if spec not in (torch.bfloat16, torch.float16, torch.float32):
            raise SlimkitError(f"dtype {spec} is not supported; use bfloat16, float16 or float32")
        return spec
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return config_dtype(config) if config is not None else torch.float32
    if spec not in DTYPES:
        raise SlimkitError(f"unknown dtype {spec!r}; use auto, bfloat16, float16 or float32")
    return DTYPES[spec]


def compute_dtype_for(device: torch.device, storage: torch.dtype) -> torch.dtype:
    """Block forwards run in the model dtype on CUDA and in fp32 on a CPU."""
    return storage if device.type == "cuda" else torch.float32


@dataclass(frozen=True)
class Placement:
    """Where blocks compute (``device``, ``compute``) and how the model is stored (``storage``)."""

    device: torch.device
    storage: torch.dtype
    compute: torch.dtype

    @classmethod
    def make(cls, device="auto", storage: torch.dtype = torch.float32) -> "Placement":
        dev = resolve_device(device)
        return cls(dev, storage, compute_dtype_for(dev, storage))

    @property
    def offloads(self) -> bool:
        """True when onloading a block changes its device or dtype."""
        return self.device.type != "cpu" or self.compute != self.storage

    def describe(self) -> dict:
        d = {"device": str(self.device), "storage_dtype": str(self.storage).removeprefix("torch."),
             "compute_dtype": str(self.compute).removeprefix("torch.")}
        if self.device.type == "cuda":
            d["name"] = torch.cuda.get_device_name(self.device)
        return d

    # ---- blocks ---------------------------------------------------------------------------
    def onload(self, module: nn.Module) -> dict[str, tuple[torch.device, torch.dtype]]:
        """Move ``module``'s parameters to the compute device in the compute dtype (floating
        parameters only), its buffers to the device (dtype kept: e.g. rotary frequencies stay
        fp32). Returns where each parameter came from, for ``offload``."""
        home: dict[str, tuple[torch.device, torch.dtype]] = {}
        for name, p in module.named_parameters():
            home[name] = (p.device, p.dtype)
            target = self.compute if p.is_floating_point() else p.dtype
            if p.device != self.device or p.dtype != target:
                p.data = p.data.to(self.device, target)
        for b in module.buffers():
            if b.device != self.device:
                b.data = b.data.to(self.device)
        return home

    def offload(self, module: nn.Module, home: dict[str, tuple[torch.device, torch.dtype]]) -> None:
        """Move ``module`` back where ``onload`` found it, in its storage dtype."""
        for name, p in module.named_parameters():
            dev, dt = home.get(name, (torch.device("cpu"), self.storage))
            if p.device != dev or p.dtype != dt:
                p.data = p.data.to(dev, dt)
        for b in module.buffers():
            if b.device.type != "cpu":
                b.data = b.data.cpu()

    def as_stored(self, w: torch.Tensor, like: torch.dtype | None = None) -> torch.Tensor:
        """``w`` rounded to what the checkpoint will hold, in the compute dtype: the probe forward
        then sees exactly the weights that are written."""
        stored = like or self.storage
        return w.to(stored).to(self.compute)


def to_device(obj, device: torch.device, float_dtype: torch.dtype | None = None):
    """Tensors inside ``obj`` (nested tuples / lists / dicts, e.g. a block's keyword arguments:
    masks, rotary embeddings) on ``device``; floating ones in ``float_dtype`` when given."""
    if isinstance(obj, torch.Tensor):
        if float_dtype is not None and obj.is_floating_point() and obj.dtype != float_dtype:
            return obj.to(device, float_dtype, non_blocking=True)
        return obj.to(device, non_blocking=True) if obj.device != device else obj
    if isinstance(obj, dict):
        return {k: to_device(v, device, float_dtype) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(to_device(v, device, float_dtype) for v in obj)
    return obj


def peak_device_memory_mb(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


def free_device_memory(device: torch.device) -> int | None:
    """Free bytes on a CUDA device (None on a CPU)."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free)


def module_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


class placed:
    """Context manager: ``models`` compute on ``placement`` for the duration of the block.

    Nothing moves when the placement is the CPU in the storage dtype. On a CUDA device, models
    that fit together in half of its free memory move there whole (and back afterwards).
    Otherwise (a CPU computing in fp32 over a bf16 model, or models too large for the device),
    the parts outside the decoder blocks (embeddings, final norm, head) are onloaded for the
    duration and every decoder block is onloaded just before it runs and offloaded right after,
    so only one block of each model is in the compute form at a time."""

    def __init__(self, placement: "Placement", *models: nn.Module):
        self.placement = placement
        self.models = [m for m in models if m is not None]
        self._undo: list = []

    def __enter__(self):
        p = self.placement
        if not p.offloads:
            return self
        if p.device.type == "cuda" and p.compute == p.storage:
            free = free_device_memory(p.device) or 0
            if sum(module_bytes(m) for m in self.models) <= free // 2:
                for m in self.models:
                    home = p.onload(m)
                    self._undo.append(lambda m=m, home=home: p.offload(m, home))
                return self
        from ..models.layout import layout_for  # models/ sits above this seam

        for m in self.models:
            blocks = layout_for(m).blocks(m)
            in_blocks = {id(t) for t in list(blocks.parameters()) + list(blocks.buffers())}
            homes, seen = {}, set(in_blocks)
            for name, mod in m.named_modules():
                for n, t in mod.named_parameters(recurse=False):
                    if id(t) in seen:  # inside a block, or tied to a parameter already moved
                        continue
                    seen.add(id(t))
                    homes[(name, n)] = (t.device, t.dtype)
                    target = p.compute if t.is_floating_point() else t.dtype
                    t.data = t.data.to(p.device, target)
                for b in mod.buffers(recurse=False):
                    if id(b) not in in_blocks:
                        b.data = b.data.to(p.device)

            def undo(m=m, homes=homes, blocks=blocks):
                for (name, n), (dev, dt) in homes.items():
                    t = getattr(m.get_submodule(name), n)
                    t.data = t.data.to(dev, dt)
                for b in m.buffers():
                    if b.device.type != "cpu":
                        b.data = b.data.cpu()
            self._undo.append(undo)
            for blk in blocks:
                state = {}

                def pre(mod, args, kwargs, state=state):
                    state["home"] = p.onload(mod)
                    return to_device(args, p.device, p.compute), to_device(kwargs, p.device, p.compute)

                def post(mod, args, output, state=state):
                    p.offload(mod, state.pop("home"))

                h1 = blk.register_forward_pre_hook(pre, with_kwargs=True)
                h2 = blk.register_forward_hook(post)
                self._undo.append(lambda h1=h1, h2=h2: (h1.remove(), h2.remove()))
        return self

    def __exit__(self, *exc):
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()
        return False


def release_host_memory() -> None:
    """Hand freed heap memory back to the OS (glibc's malloc_trim). Blocks onloaded and offloaded
    one after another allocate and free tens of MiB each; glibc keeps such freed chunks in its
    heap, so without this the process's footprint creeps up with depth."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def bound_host_heap(mmap_threshold: int = 1 << 20) -> None:
    """Serve every host allocation of ``mmap_threshold`` bytes or more with its own mapping, which
    goes back to the OS when freed. glibc's default threshold adapts upwards (to 32 MiB) once
    large chunks are freed, after which tensors of a few MiB come from the heap and the block-by-
    block churn fragments it: peak RSS then grows with the number of blocks."""
    libc = _glibc()
    if libc is not None:
        M_MMAP_THRESHOLD = -3
        libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold)


def _glibc():
    global _libc
    if _libc is None:
        try:
            import ctypes

            lib = ctypes.CDLL("libc.so.6")
            _libc = lib if hasattr(lib, "malloc_trim") and hasattr(lib, "mallopt") else False
        except OSError:  # not glibc: nothing to do
            _libc = False
    return _libc or None


_libc = None
