"""Greedy generation from a packed (or any slimkit) folder, timed."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from .source import PackError, first_line


def generate(directory: str | Path, prompt: str, max_new_tokens: int = 40, mode: str = "auto",
             head: str = "exact") -> dict:
    from transformers import AutoTokenizer

    from .runtime import load

    t = time.perf_counter()
    model = load(directory, mode=mode, head=head)
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
    model.config.use_cache = True
    with torch.inference_mode():
        t = time.perf_counter()
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                             pad_token_id=tok.pad_token_id or tok.eos_token_id)
        dt = time.perf_counter() - t
    new = out[0, ids.shape[1]:]
    return {"text": tok.decode(new, skip_special_tokens=True), "new_tokens": int(new.numel()),
            "tokens_per_s": new.numel() / dt if dt > 0 else 0.0, "load_s": load_s}
