"""Fixtures for the C++ runtime tests: the tiled-buckets aoti bundle and the `stdrc_run` binary, once per session
(the one-stage and two-stage runner tests share tests/conftest.py `aoti_two_stage_bundle`)."""

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


@pytest.fixture(scope="session")
def aoti_tiled_buckets_bundle(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    """The tiny preset as aoti packages for two buckets of different frame counts at 64x192, decoded in 96 px
    tiles (32 px overlap: columns [0,3) [2,5) [4,6), two widths): one DiT with dynamic tokens, one decoder with
    dynamic latent frames and tile width. One build serves the tiling and the bucket tests (each aoti build is
    minutes of Inductor). (With frames, tile height and tile width all dynamic, Inductor fails to lower the
    decoder's reflect padding: torch 2.13, measured; the build refuses that mix.)"""
    from stdrc.engines.build import BuildConfig, build_engines

    out = tmp_path_factory.mktemp("aoti-tiled-buckets") / "tiny-tiled-buckets"
    return build_engines(BuildConfig(out=out, cache_dir=cache_dir, backend="aoti", buckets=("9x192x64", "17x192x64"),
                                     decode_tile=96, decode_overlap=32, progress=False))


def _missing_tools() -> str | None:
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install -y cmake g++)"
    if not any((d / "nlohmann" / "json.hpp").is_file() for d in JSON_HEADER_DIRS):
        return "nlohmann-json headers are missing (apt-get install -y nlohmann-json3-dev)"
    return None


ALLOW_SKIP = "STDRC_ALLOW_SKIP_CPP"  # =1: skip (not fail) the C++ tests where cmake/g++/nlohmann-json are missing


@pytest.fixture(scope="session")
def cpp_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """libstdrc + tools built with CMake against the torch wheel's libtorch. STDRC_CPP_BUILD=DIR reuses a folder.

    Missing build tools fail the tests, unless STDRC_ALLOW_SKIP_CPP=1 says a machine without them may skip.
    """
    reason = _missing_tools()
    if reason:
        if os.environ.get(ALLOW_SKIP) == "1":
            pytest.skip(f"C++ runtime not built ({ALLOW_SKIP}=1): {reason}")
        pytest.fail(f"C++ runtime cannot be built: {reason}; or set {ALLOW_SKIP}=1 to skip the C++ tests")
    import torch

    build = Path(os.environ.get("STDRC_CPP_BUILD") or tmp_path_factory.mktemp("cpp-build"))
    configure = ["cmake", "-S", str(CPP_DIR), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                 f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}", f"-DPython_EXECUTABLE={sys.executable}"]
    start = time.perf_counter()
    for cmd in (configure, ["cmake", "--build", str(build), "-j", "2"]):
        done = subprocess.run(cmd, check=False, capture_output=True, text=True)
        if done.returncode != 0:
            pytest.fail(f"{' '.join(cmd[:2])} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    print(f"C++ runtime built in {time.perf_counter() - start:.1f} s")
    return build


@pytest.fixture(scope="session")
def cpp_runner(cpp_build: Path) -> Path:
    return cpp_build / "stdrc_run"


@pytest.fixture(scope="session")
def cpp_tiles(cpp_build: Path) -> Path:
    return cpp_build / "stdrc_tiles"


@pytest.fixture(scope="session")
def cpp_manifest(cpp_build: Path) -> Path:
    return cpp_build / "stdrc_manifest"
