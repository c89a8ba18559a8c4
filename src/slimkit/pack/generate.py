"""Greedy generation from a packed (or any slimkit) folder, timed."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from .source import PackError, first_line


def generate(directory: str | Path, prompt: str, max_new_tokens: int = 40, mode: str = "auto",
             head: str = "exact", device: str | torch.device = "cpu") -> dict:
    """Greedy continuation of ``prompt``. ``device``: where the model runs (``cpu``, ``auto``,
    ``cuda``, ``cuda:N``; see runtime.load); the token ids are put on the model's device."""
    from transformers import AutoTokenizer

    from .runtime import load

    t = time.perf_counter()
    model = load(directory, mode=mode, head=head, device=device)
    try:
        tok = AutoTokenizer.from_pretrained(str(directory))
    except Exception as e:
        raise PackError(f"cannot load the tokenizer of {str(directory)!r}: {first_line(e)}") from None
    load_s = time.perf_counter() - t
    if getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
    ids = ids.to(model.device)
    model.config.use_cache = True
    with torch.inference_mode():
        t = time.perf_counter()
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                             pad_token_id=tok.pad_token_id or tok.eos_token_id)
        if ids.device.type == "cuda":
            torch.cuda.synchronize(ids.device)  # time the work, not its launch
        dt = time.perf_counter() - t
    new = out[0, ids.shape[1]:].cpu()
    return {"text": tok.decode(new, skip_special_tokens=True), "new_tokens": int(new.numel()),
            "tokens_per_s": new.numel() / dt if dt > 0 else 0.0, "load_s": load_s}
