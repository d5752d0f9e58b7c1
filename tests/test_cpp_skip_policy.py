"""The C++ tests fail, not skip, where their build tools are missing, unless STDRC_ALLOW_SKIP_CPP=1."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ONE_CPP_TEST = "tests/cpp/test_cpp_tiling.py::test_cpp_placement_and_masks_match_ltx_core[2-3-64-32]"


def _run_without_cmake(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    bare = tmp_path / "bin"  # a PATH with python only: no cmake, no c++
    bare.mkdir(exist_ok=True)
    (bare / "python").unlink(missing_ok=True)
    (bare / "python").symlink_to(sys.executable)
    environ = {k: v for k, v in os.environ.items() if k not in ("STDRC_ALLOW_SKIP_CPP", "STDRC_CPP_BUILD")}
    environ.update(PATH=str(bare), **env)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "--basetemp",
                           str(tmp_path / "t"), ONE_CPP_TEST], cwd=ROOT, env=environ, capture_output=True,
                          text=True, timeout=600, check=False)


@pytest.mark.parametrize("allow, code, word", [(None, 1, "cannot be built"), ("1", 0, "SKIPPED")])
def test_missing_cpp_tools(tmp_path: Path, allow: str | None, code: int, word: str) -> None:
    proc = _run_without_cmake(tmp_path, **({"STDRC_ALLOW_SKIP_CPP": allow} if allow else {}))
    assert proc.returncode == code, proc.stdout[-3000:]
    assert word in proc.stdout, proc.stdout[-3000:]
