"""Low-rank adapters as a standard PEFT LoRA folder, next to a base folder with the base weights.

SLiM's y = x W^T + (x L) R with L (in, r), R (r, out) is LoRA's y = x W^T + (alpha / r) x A^T B^T
with A = L^T (r, in), B = R^T (out, r) and lora_alpha = r (scaling exactly 1). Per-module ranks
go into rank_pattern / alpha_pattern; target_modules is a regex of exactly the adapted modules.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
from collections import Counter
from pathlib import Path

from safetensors.torch import save_file

from ..pack.native import COPY_FILES
from ..pack.source import PackError, SlimkitFolder

log = logging.getLogger(__name__)

BASE_DIR, ADAPTER_DIR = "base", "adapter"


def write_peft(src: str | Path, out: Path) -> dict:
    """out/base: HF folder with the base weights (fake-quantized, without adapters);
    out/adapter: adapter_config.json + adapter_model.safetensors."""
    folder = SlimkitFolder(src)
    base = dict(folder.model_tensors)
    adapters, ranks = {}, {}
    for rec in folder.records():
        if not rec.has_adapters:
            continue
        if not rec.exact():
            raise PackError(f"{rec.name}: the recorded base + adapters do not reproduce the model's weight")
        base[rec.name + ".weight"] = rec.base_weight().to(rec.effective.dtype)
        L, R = rec.tensors["L"].float(), rec.tensors["R"].float()
        adapters[f"base_model.model.{rec.name}.lora_A.weight"] = L.T.contiguous()  # (r, in)
        adapters[f"base_model.model.{rec.name}.lora_B.weight"] = R.T.contiguous()  # (out, r)
        ranks[rec.name] = L.shape[1]
    if not adapters:
        raise PackError(f"{str(src)!r} has no low-rank adapters to export as PEFT; "
                        f"use --format compressed-tensors or native")
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {f"^{re.escape(n)}$": k for n, k in ranks.items() if k != r}
    (out / BASE_DIR).mkdir()
    (out / ADAPTER_DIR).mkdir()
    save_file({k: v.contiguous() for k, v in base.items()}, str(out / BASE_DIR / "model.safetensors"),
              metadata={"format": "pt"})
    for f in COPY_FILES:
        if f not in ("report.json", "report.md") and (folder.dir / f).is_file():
            shutil.copy2(folder.dir / f, out / BASE_DIR / f)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": r,
        "target_modules": "^(" + "|".join(re.escape(n) for n in ranks) + ")$",
        "rank_pattern": pattern, "alpha_pattern": dict(pattern),
        "base_model_name_or_path": f"../{BASE_DIR}", "bias": "none", "lora_dropout": 0.0,
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "inference_mode": True,
        "modules_to_save": None, "init_lora_weights": True,
    }
    save_file(adapters, str(out / ADAPTER_DIR / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / ADAPTER_DIR / "adapter_config.json").write_text(json.dumps(config, indent=1))
    log.info("peft: %d adapters (rank %d%s)", len(ranks), r, f", {len(pattern)} other ranks" if pattern else "")
    return config
