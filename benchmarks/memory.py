"""Peak memory against the number of blocks -> the "memory" section of docs/results.md (issue 7).

    python benchmarks/memory.py              # 4 vs 32 blocks at equal width, in memory and --low-memory
    python benchmarks/memory.py --large      # also a 32-block LLaMA-7B-shaped model (> 24 GiB of fp32)
    python benchmarks/memory.py --fresh      # recompute

Synthetic LLaMA models with random weights (std 0.02, seed = block index) are generated to disk
block by block (one safetensors shard per block, so generating is bounded too) with the default
model's tokenizer (49,152 tokens); calibration is the usual shakespeare split. Each compression
runs in its own process and reports its peak RSS (ru_maxrss: every page the process ever held,
file-backed included). No evaluation (--no-eval): the point is the compression's footprint.
"""
from __future__ import annotations

import argparse
import json
import shutil

import torch
from safetensors.torch import save_file

from common import REPORTS, RUNS, command_lines, compress_run, finished, machine, shared_mark, shared_note, write_section

SYNTH = RUNS / "synthetic"
SMALL = dict(hidden=1024, inter=2816, heads=16, kv=4)  # 11.0 M parameters per block
LARGE = dict(hidden=4096, inter=11008, heads=32, kv=32)  # LLaMA-7B's block: 202 M parameters


# the runs of 2026-11-24 were timed while the SLiM benchmark shared the two cores (tag -> that day); a later run
# of the same command is not marked
SHARED_MACHINE = {f"memory-llama-{shape}-rtn-w4-g64-{mode}": "2026-11-24"
                  for shape, mode in (("1024x4", "eager"), ("1024x32", "eager"), ("1024x4", "low"), ("1024x32", "low"),
                                      ("4096x32", "low"))}
SHARED_WHY = "while the SLiM benchmark shared the 2 cores"

SIZES = REPORTS / "memory-sizes.json"  # fp32 GiB of each synthetic model (tracked, like the reports)


def make_model(path, blocks: int, hidden: int, inter: int, heads: int, kv: int, needed: bool = True,
               dtype: str = "float32") -> float:
    """Write a random LLaMA of this shape to ``path`` in ``dtype`` (unless it is there, or not
    ``needed`` because its runs are finished); returns its size in GiB in that dtype."""
    from transformers import AutoTokenizer, LlamaConfig

    from slimkit.models.loading import resolve
    sizes = json.loads(SIZES.read_text()) if SIZES.is_file() else {}
    if (path / "config.json").is_file() or (not needed and path.name in sizes):
        return sizes[path.name]
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    tok = AutoTokenizer.from_pretrained(resolve("default")[1])
    vocab = len(tok)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=blocks,
                      num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=False,
                      max_position_embeddings=2048, dtype=dtype)
    dt = getattr(torch, dtype)
    head = hidden // heads
    shapes = {"self_attn.q_proj.weight": (hidden, hidden), "self_attn.k_proj.weight": (kv * head, hidden),
              "self_attn.v_proj.weight": (kv * head, hidden), "self_attn.o_proj.weight": (hidden, hidden),
              "mlp.gate_proj.weight": (inter, hidden), "mlp.up_proj.weight": (inter, hidden),
              "mlp.down_proj.weight": (hidden, inter)}
    n = blocks + 1
    weight_map, total = {}, 0
    for i in range(blocks + 1):
        g = torch.Generator().manual_seed(i)
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        if i < blocks:
            t = {f"model.layers.{i}.{k}": torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}
            t |= {f"model.layers.{i}.{k}": torch.ones(hidden) for k in ("input_layernorm.weight",
                                                                        "post_attention_layernorm.weight")}
        else:
            t = {"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g) * 0.02,
                 "lm_head.weight": torch.randn(vocab, hidden, generator=g) * 0.02, "model.norm.weight": torch.ones(hidden)}
        t = {k: v.to(dt) for k, v in t.items()}
        save_file(t, str(path / name), metadata={"format": "pt"})
        weight_map |= {k: name for k in t}
        total += sum(v.numel() * v.element_size() for v in t.values())
        del t
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}))
    cfg.save_pretrained(path)
    tok.save_pretrained(path)
    gib = total / 2**30
    SIZES.write_text(json.dumps(sizes | {path.name: gib}, indent=1))
    return gib


def run(model_dir, blocks: int, recipe: str, low: bool, calib: list[str], fresh: bool) -> dict:
    tag = f"memory-{model_dir.name}-{recipe}-{'low' if low else 'eager'}"
    extra = ["--no-eval", *calib] + (["--low-memory"] if low else [])
    r = compress_run(recipe, tag=tag, extra=extra, fresh=fresh, model=str(model_dir.relative_to(RUNS.parent.parent)))
    c = r["compression"]
    mark = shared_mark(tag, r, SHARED_MACHINE)
    return {"label": f"{model_dir.name}: {recipe}, {'--low-memory' if low else 'in memory'}{mark}", "blocks": blocks,
            "rss": r["peak_rss_compress_mb"], "time": c["timings"]["total"], "command": r["command"],
            "bpw": c["bits_per_weight"], "date": r.get("date"), "threads": r.get("threads"), "mark": mark}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fresh", nargs="?", const="all", choices=["all", "small", "large"],
                    help="run again: every model (the default), only the 4- and 32-block ones, or only the large one")
    ap.add_argument("--large", action="store_true")
    args = ap.parse_args()
    fresh_small, fresh_large = args.fresh in ("all", "small"), args.fresh in ("all", "large")
    tags = lambda name: [f"memory-{name}-rtn-w4-g64-{m}" for m in ("eager", "low")]  # noqa: E731
    sizes = {b: make_model(SYNTH / f"llama-1024x{b}", b, **SMALL,
                           needed=fresh_small or not all(finished("", t) for t in tags(f"llama-1024x{b}")))
             for b in (4, 32)}
    rows = []
    recipe, calib = "rtn-w4-g64", ["--nsamples", "8", "--seqlen", "512"]
    for low in (False, True):
        pair = [run(SYNTH / f"llama-1024x{b}", b, recipe, low, calib, fresh_small) for b in (4, 32)]
        rows.append((recipe, low, calib, pair))
    lines = ["## Peak memory against depth (issue 7)", "",
             "Synthetic random LLaMA models of equal width (hidden 1024, MLP 2816, 16 heads / 4 KV heads, "
             f"vocabulary 49,152 untied): 4 blocks = {sizes[4]:.2f} GiB of fp32 weights, 32 blocks = "
             f"{sizes[32]:.2f} GiB. Peak RSS of the compressing process (load + compress + save, no eval). "
             f"Machine: {machine([r for *_, pair in rows for r in pair])}.", "",
             "Regenerate: `python benchmarks/memory.py --fresh` (add `--large` for the > 24 GiB model).", "",
             "| recipe | mode | calibration | peak RSS, 4 blocks (MiB) | peak RSS, 32 blocks (MiB) | ratio 32/4 | "
             "slope (MiB/block) | time 4 / 32 blocks (s) |", "|---|---|---|---|---|---|---|---|"]
    cmd_rows = []
    for recipe, low, calib, (a, b) in rows:
        lines.append(f"| {recipe} | {'--low-memory' if low else 'in memory'} | {' '.join(calib)} | {a['rss']:.0f} | "
                     f"{b['rss']:.0f} | {b['rss'] / a['rss']:.2f} | {(b['rss'] - a['rss']) / 28:.1f} | "
                     f"{a['time']:.0f}{a['mark']} / {b['time']:.0f}{b['mark']} |")
        cmd_rows += [a, b]
    if args.large:
        gib = make_model(SYNTH / "llama-4096x32", 32, **LARGE,
                         needed=fresh_large or not finished("", "memory-llama-4096x32-rtn-w4-g64-low"))
        big = run(SYNTH / "llama-4096x32", 32, "rtn-w4-g64", True, ["--nsamples", "2", "--seqlen", "128"], fresh_large)
        lines += ["", f"A LLaMA-7B-shaped model (hidden 4096, MLP 11008, 32 blocks, vocabulary 49,152 untied): "
                      f"**{gib:.1f} GiB of fp32 weights**, more than this machine's 24 GiB of RAM, compressed with "
                      f"RTN W4 g64 and `--low-memory` at a peak RSS of **{big['rss'] / 1024:.2f} GiB** in "
                      f"{big['time']:.0f} s{big['mark']} (2 x 128 probe tokens, a run of {big['date']}). What the peak holds: the shell (embedding "
                      "and head, 1.5 GiB in fp32, plus block 0), the block being compressed and the copy it "
                      "is filled into (0.75 GiB each), and the working copies of a Linear under RTN; none of "
                      "it depends on the depth. The synthetic model is deleted after the run "
                      "(`benchmarks/runs/synthetic/`, 26 GB); `--fresh --large` writes it again (about 2 minutes)."]
        cmd_rows.append(big)
        shutil.rmtree(RUNS / "memory-llama-4096x32-rtn-w4-g64-low", ignore_errors=True)  # 27 GB of output
        shutil.rmtree(SYNTH / "llama-4096x32", ignore_errors=True)  # and 26 GB of input
    lines += ["", *shared_note(cmd_rows, SHARED_MACHINE, SHARED_WHY),
              "In the commands, the options after `-q` override the defaults before it (argparse keeps the last "
              "value).", ""] + command_lines(cmd_rows)
    write_section("memory", "\n".join(lines))


if __name__ == "__main__":
    main()
