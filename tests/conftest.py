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
