"""Session fixtures: tiny random models of every supported family, and a text file."""
import pytest

from helpers import TEXT, make_model


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {t: make_model(t, root / t) for t in ("llama", "qwen2", "mistral", "opt")}


@pytest.fixture(scope="session")
def tiny_llama(tiny_models):
    return tiny_models["llama"]


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("text") / "calib.txt"
    p.write_text(TEXT)
    return p


@pytest.fixture(scope="module")
def compressed(tiny_llama, text_file, tmp_path_factory):
    """The tiny llama compressed with rtn-w4-g64 (no evaluation), once per test module."""
    from slimkit.api import compress as run_compress
    out = tmp_path_factory.mktemp("compressed") / "out"
    run_compress(str(tiny_llama), "rtn-w4-g64", out, calib=str(text_file), nsamples=4, seqlen=32,
                 eval_data=None, progress=False)
    return out
