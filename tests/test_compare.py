"""Report plots and `slimkit compare`."""
import json
import struct
import subprocess
import sys

import pytest

from slimkit.eval.plots import pareto


def png_size(path):
    """(width, height) of a PNG file, after checking its signature and first chunk."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def runs(tiny_llama, text_file, tmp_path_factory):
    from slimkit.api import compress

    root = tmp_path_factory.mktemp("runs")
    for recipe in ("rtn-w4-g64", "rtn-w2-g64", "gptq-w3-g64"):
        compress(str(tiny_llama), recipe, root / recipe, calib=str(text_file), nsamples=4, seqlen=32,
                 eval_data=str(text_file), eval_tokens=256, progress=False)
    return root


def test_report_has_plots(runs):
    d = runs / "gptq-w3-g64"
    md = (d / "report.md").read_text()
    for name in ("errors_by_layer.png", "errors_by_block.png"):
        assert f"]({name})" in md
        w, h = png_size(d / name)
        assert w >= 600 and h >= 300 and (d / name).stat().st_size > 10_000


def test_pareto_front():
    pts = [(4.0, 10.0), (3.0, 12.0), (4.5, 9.0), (3.5, 13.0), (2.0, 30.0), (4.5, 11.0)]
    assert pareto(pts) == [4, 1, 0, 2]


def test_compare_writes_table_and_plot(runs, tmp_path):
    dirs = [runs / r for r in ("rtn-w4-g64", "rtn-w2-g64", "gptq-w3-g64")]
    r = subprocess.run([sys.executable, "-m", "slimkit", "compare", *map(str, dirs), "--out", str(tmp_path / "c")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    table = (tmp_path / "c" / "compare.md").read_text()
    reports = [json.loads((d / "report.json").read_text()) for d in dirs]
    for d, rep in zip(dirs, reports):
        line = next(x for x in table.splitlines() if x.startswith(f"| {d.name} |"))
        assert f"{rep['compression']['bits_per_weight']:.3f}" in line and f"{rep['eval']['ppl']:.3f}" in line
    front = {x.split(" | ")[0][2:] for x in table.splitlines() if x.endswith("| yes |")}
    pts = [(rep["compression"]["bits_per_weight"], rep["eval"]["ppl"]) for rep in reports]
    assert front == {dirs[i].name for i in pareto(pts)}
    assert f"Dense perplexity {reports[0]['eval']['ref_ppl']:.3f}" in table
    w, h = png_size(tmp_path / "c" / "compare.png")
    assert w >= 600 and (tmp_path / "c" / "compare.png").stat().st_size > 10_000


def test_compare_refuses_what_is_not_a_run(runs, compressed, tmp_path):
    cases = [([str(runs / "rtn-w4-g64"), str(tmp_path)], "is not a slimkit run (no report.json)"),
             ([str(compressed)], "has no perplexity"),
             ([str(runs / "nope")], "is not a folder")]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "report.json").write_text("{\"x\": 1}")
    cases.append(([str(bad)], "its report.json is not a compress report"))
    for args, msg in cases:
        r = subprocess.run([sys.executable, "-m", "slimkit", "compare", *args, "--out", str(tmp_path / "out")],
                           capture_output=True, text=True)
        assert r.returncode == 2 and msg in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
        assert not (tmp_path / "out").exists()
