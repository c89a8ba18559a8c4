"""benchmarks/noise.py's account of a run made again by later code: which earlier version of a report it
compares with (same command, another perplexity), how far the two runs' per-Linear errors part, and that a
recipe redefined under its name is told apart from one computed in another floating-point order."""
import json
import subprocess

import pytest

from test_bench_seeds import ROOT


@pytest.fixture
def noise(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import noise as mod
    return mod


STAGES = [{"method": "gptq", "bits": 4, "group_size": 64}]


def report(ppl, errors, command="slimkit compress default --recipe r", stages=STAGES):
    names = [f"model.layers.{b}.{n}" for b in range(len(errors)) for n in ("q", "o")]
    flat = [e for pair in errors for e in pair]
    return {"command": command, "eval": {"ppl": ppl}, "recipe": {"name": "r", "stages": stages},
            "compression": {"layers": [{"name": n, "rel_error": e} for n, e in zip(names, flat)]}}


def commit(repo, path, data, message):
    path.write_text(json.dumps(data))
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message], cwd=repo, check=True)


def test_earlier_versions_are_those_with_the_same_command_and_another_perplexity(noise, tmp_path):
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    path = tmp_path / "r.json"
    commit(tmp_path, path, report(90.0, [(0.1, 0.2)]), "oldest")
    commit(tmp_path, path, report(95.0, [(0.1, 0.2)], command="slimkit compress default --recipe r --seed 1"),
           "another command")
    commit(tmp_path, path, report(100.0, [(0.1, 0.2)]), "same ppl as now")
    path.write_text(json.dumps(report(100.0, [(0.1, 0.2)])))
    assert [v["eval"]["ppl"] for _, v in noise.earlier_versions(path, tmp_path)] == [90.0]
    path.write_text(json.dumps(report(80.0, [(0.1, 0.2)])))
    assert [v["eval"]["ppl"] for _, v in noise.earlier_versions(path, tmp_path)] == [90.0, 100.0]
    never_committed = tmp_path / "new.json"
    never_committed.write_text(json.dumps(report(1.0, [(0.1, 0.2)])))
    assert noise.earlier_versions(never_committed, tmp_path) == []


def test_drift_finds_where_two_runs_part(noise):
    then = report(100.0, [(0.1, 0.2), (0.3, 0.4), (0.5, 0.6)])
    now = report(110.0, [(0.1 * (1 + 1e-8), 0.2 * (1 + 1e-5)), (0.3, 0.4 * (1 + 1e-4)), (0.5 * 1.01, 0.6)])
    d = noise.drift(now, then)
    assert d["first"] == pytest.approx(1e-8, rel=1e-3)
    assert d["block0"] == pytest.approx(1e-5, rel=1e-3)
    assert d["first_over"] == 2
    assert noise.drift(now, now)["first_over"] is None
    assert noise.drift(report(1.0, [(0.1, 0.2)]), then) is None  # not the same Linears


def test_a_recipe_with_an_option_added_since_at_its_default_is_the_same_one_changed_is_not(noise):
    old = report(100.0, [(0.1, 0.2)])
    assert noise.same_recipe(report(90.0, [(0.1, 0.2)], stages=[STAGES[0] | {"weighted_search": False}]), old)
    assert not noise.same_recipe(report(90.0, [(0.1, 0.2)], stages=[STAGES[0] | {"weighted_search": True}]), old)
    assert not noise.same_recipe(report(90.0, [(0.1, 0.2)], stages=[STAGES[0] | {"bits": 3}]), old)


def timed(seconds, day, command="slimkit compress default --recipe r"):
    return {"command": command, "date": day, "compression": {"timings": {"total": seconds}}}


def test_shared_vs_alone_measures_what_sharing_the_cores_cost(noise, tmp_path, monkeypatch):
    import common
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "benchmarks" / "reports").mkdir(parents=True)
    path = tmp_path / "benchmarks" / "reports" / "r.json"
    monkeypatch.setenv("GIT_COMMITTER_DATE", "2026-11-20T12:00:00")
    commit(tmp_path, path, timed(100.0, "2026-11-20"), "before the shared day")
    monkeypatch.setenv("GIT_COMMITTER_DATE", "2026-11-24T12:00:00")
    commit(tmp_path, path, timed(900.0, "2026-11-24"), "the shared run")
    assert common.shared_vs_alone({"r": "2026-11-24"}, tmp_path) == []  # not run again yet
    monkeypatch.setenv("GIT_COMMITTER_DATE", "2026-12-01T12:00:00")
    commit(tmp_path, path, timed(300.0, "2026-12-01") | {"finetune": {"seconds": 50.0}}, "alone")
    assert common.shared_vs_alone({"r": "2026-11-24"}, tmp_path) == [("r", 900.0, 350.0)]
    assert common.shared_vs_alone({"r": "2026-11-23", "absent": "2026-11-24"}, tmp_path) == []
    commit(tmp_path, path, timed(300.0, "2026-12-01", command="slimkit compress default --recipe r --seed 1"), "other")
    assert common.shared_vs_alone({"r": "2026-11-24"}, tmp_path) == []
    note = common.shared_note([{"label": "row †"}], {})
    assert note and "†" in note[0] and common.shared_note([{"label": "row"}], {"r": "2026-11-24"}) == []
