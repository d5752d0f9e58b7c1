"""Fixtures for the C++ runtime tests: the tiny aoti bundle and the `stdrc_run` binary, once per session."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

CPP_DIR = Path(__file__).resolve().parents[2] / "runtime" / "cpp"
JSON_HEADER_DIRS = (Path("/usr/include"), Path("/usr/local/include"))


def build_aoti_bundle(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    """The tiny preset as aoti packages, built once per session (shared with tests/engines/test_aoti.py)."""
    from stdrc.engines.build import BuildConfig, build_engines

    out = tmp_path_factory.getbasetemp() / "aoti-bundle" / "tiny"
    if not (out / "manifest.json").is_file():  # BundleWriter renames the folder into place only when complete
        build_engines(BuildConfig(out=out, cache_dir=cache_dir, backend="aoti", progress=False))
    return out


@pytest.fixture(scope="session")
def aoti_tiled_bundle(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    """The tiny preset with a 64 px decode tile (32 px overlap): its 64x96 frames decode as two tiles."""
    from stdrc.engines.build import BuildConfig, build_engines

    out = tmp_path_factory.mktemp("aoti-tiled") / "tiny-tiled"
    return build_engines(BuildConfig(out=out, cache_dir=cache_dir, backend="aoti", decode_tile=64,
                                     decode_overlap=32, progress=False))


@pytest.fixture(scope="session")
def aoti_bundle(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    return build_aoti_bundle(tmp_path_factory, cache_dir)


def _missing_tools() -> str | None:
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install -y cmake g++)"
    if not any((d / "nlohmann" / "json.hpp").is_file() for d in JSON_HEADER_DIRS):
        return "nlohmann-json headers are missing (apt-get install -y nlohmann-json3-dev)"
    return None


@pytest.fixture(scope="session")
def cpp_runner(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`stdrc_run` built with CMake against the torch wheel's libtorch. STDRC_CPP_BUILD=DIR reuses a build folder."""
    reason = _missing_tools()
    if reason:
        pytest.skip(f"C++ runner not built: {reason}")
    import torch

    build = Path(os.environ.get("STDRC_CPP_BUILD") or tmp_path_factory.mktemp("cpp-build"))
    configure = ["cmake", "-S", str(CPP_DIR), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                 f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}", f"-DPython_EXECUTABLE={sys.executable}"]
    start = time.perf_counter()
    for cmd in (configure, ["cmake", "--build", str(build), "-j", "2"]):
        done = subprocess.run(cmd, check=False, capture_output=True, text=True)
        if done.returncode != 0:
            pytest.fail(f"{' '.join(cmd[:2])} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    print(f"stdrc_run built in {time.perf_counter() - start:.1f} s")
    return build / "stdrc_run"
