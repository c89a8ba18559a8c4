"""The seed helpers of benchmarks/common.py that the results document's claims rest on: the win rule,
which runs a headline row's other seeds are (and that they are run only when asked), and the column
that prints their spread."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def common(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("bench_common", ROOT / "benchmarks" / "common.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "REPORTS", tmp_path / "reports")
    monkeypatch.setattr(mod, "RUNS", tmp_path / "runs")
    return mod


def test_verdict_is_a_win_only_with_two_seeds_separate_ranges_and_a_margin_above_them(common):
    assert common.verdict([50.0], [60.0]).endswith("not yet a finding")
    assert common.verdict([50.0, 51.0], [60.0, 61.0]).endswith(": a win")
    # ranges apart, but the margin (2.5) is less than the wider range (3.0): a tie
    assert common.verdict([47.0, 50.0], [50.5, 51.5]).endswith(": a tie")
    # overlapping ranges with a lower mean: a tie, never a win
    assert common.verdict([50.0, 55.0], [52.0, 56.0]).endswith(": a tie")
    assert common.verdict([60.0, 61.0], [50.0, 51.0]).endswith(": a loss")
    assert common.verdict([52.0, 56.0], [50.0, 55.0]).endswith("the ranges overlap")


def test_spread_prints_mean_and_range(common):
    assert common.spread([3.0]) == "3.00"
    assert common.spread([1.0, 2.0, 6.0]) == "3.00 (1.00–6.00)"


def report(ppl: float, kl: float) -> dict:
    return {"eval": {"ppl": ppl, "kl": kl}, "date": "2026-12-01", "command": "slimkit compress ..."}


def test_with_seeds_reads_finished_seeds_and_runs_missing_ones_only_when_asked(common, monkeypatch):
    common.REPORTS.mkdir()
    (common.REPORTS / "rec-c32-s1.json").write_text(json.dumps(report(11.0, 0.2)))
    calls = []

    def fake_run(recipe, tag=None, extra=(), fresh=False, keep_model=False, **kw):
        calls.append((recipe, tag, list(extra)))
        return report(12.0, 0.3)

    monkeypatch.setattr(common, "compress_run", fake_run)
    seed0 = {"ppl": 10.0, "kl": 0.1, "date": "2026-11-24"}
    done = common.with_seeds(seed0, "rec", tag="rec-c32", extra=["--nsamples", "32"], run_missing=False)
    # only the finished seed 1 is read (through compress_run, which reuses a finished report), seed 2 is not run
    assert sorted(done["seeds"]) == [0, 1] and done["seeds"][0] == (10.0, 0.1)
    assert calls == [("rec", "rec-c32-s1", ["--nsamples", "32", "--seed", "1"])]
    calls.clear()
    full = common.with_seeds(seed0, "rec", tag="rec-c32", extra=["--nsamples", "32"])
    assert sorted(full["seeds"]) == [0, 1, 2]
    # the seed comes last, so it overrides the row's own --seed 0
    assert calls[-1] == ("rec", "rec-c32-s2", ["--nsamples", "32", "--seed", "2"])
    assert "2026-12-01" in common.machine([full]) and "2026-11-24" in common.machine([full])


def test_the_seeds_column_appears_only_when_a_row_has_several_seeds(common):
    one = {"label": "a", "ppl": 10.0, "kl": 0.1, "bpw": 4.0, "time": 1.0, "rss": 1.0}
    assert common.seeds_column([one]) is None
    assert "ppl, seeds" not in common.table([one])
    many = one | {"label": "b", "seeds": {0: (10.0, 0.1), 1: (12.0, 0.1), 2: (14.0, 0.1)}}
    lines = common.table([one, many]).splitlines()
    assert lines[0].endswith("| ppl, seeds 0,1,2: mean (range) |")
    assert lines[2].endswith("| — |") and lines[3].endswith("| 12.00 (10.00–14.00) |")
    assert all(line.count("|") == lines[0].count("|") for line in lines)



def test_a_cached_task_score_counts_only_for_the_run_it_scored(common):
    common.REPORTS.mkdir()
    cached = {"acc": 0.4, "stderr": 0.02, "ppl": 93.53}
    (common.REPORTS / f"rec-{common.TASK}.json").write_text(json.dumps(cached))
    assert common.task_score("rec", "benchmarks/runs/rec", of=report(93.53, 0.9), run_missing=False) == cached
    # the row was compressed again since (another perplexity): the old score is not shown for it
    assert common.task_score("rec", "benchmarks/runs/rec", of=report(90.0, 0.9), run_missing=False) is None


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def test_machine_line_states_the_threads_the_runs_recorded(common):
    import torch
    two = {"date": "2026-12-01", "threads": 2}
    assert ", 2 threads, " in common.machine([two, two])
    assert ", 1 / 2 threads, " in common.machine([two, two | {"threads": 1}])
    # an older report without the field: the known count, marked as partial; none known: said so
    assert ", 2 threads where recorded, " in common.machine([two, {"date": "2026-11-24"}])
    assert ", threads not recorded, " in common.machine([{"date": "2026-11-24"}])
    # no rows: this process (a section measured here and now)
    assert f", {torch.get_num_threads()} threads, " in common.machine()


def test_shared_note_says_how_the_marked_runs_shared_the_cores(common):
    marked = [{"label": "row †"}]
    assert "another job" in common.shared_note(marked, {})[0]
    note = common.shared_note(marked, {}, "with OMP_NUM_THREADS=1, three runs at a time")[0]
    assert note.startswith("† wall time taken with OMP_NUM_THREADS=1, three runs at a time, so the time is inflated")


def test_a_fresh_run_discards_an_unfinished_earlier_run_of_the_same_output(common, tmp_path, monkeypatch):
    """`slimkit compress` refuses an output whose partial folder is left from a stopped run (it offers
    --resume); a fresh benchmark run starts over instead of failing."""
    from slimkit.api import partial_dir

    monkeypatch.setattr(common, "ROOT", tmp_path)
    stale = partial_dir(common.RUNS / "rec")
    stale.mkdir(parents=True)
    seen = []

    def fake_compress(args, cwd, check, env):
        seen.append(stale.exists())
        out = tmp_path / args[args.index("--out") + 1]
        out.mkdir(parents=True)
        (out / "report.json").write_text(json.dumps(report(10.0, 0.1)))

    monkeypatch.setattr(common.subprocess, "run", fake_compress)
    assert common.compress_run("rec", fresh=True)["eval"]["ppl"] == 10.0
    assert seen == [False]
