"""benchmarks/build_memory.py leaves nothing in the temp folder (a default run writes ~28 GB there):
its work folder is removed when the run ends, fails or is interrupted, and kept only when --work names it."""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def build_memory():
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module("build_memory")
    finally:
        sys.path.remove(str(BENCH))


def test_temp_work_folder_is_removed_however_the_run_ends(build_memory, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with build_memory.work_folder(None) as work:
        (work / "ltx2-1layer.safetensors").write_bytes(b"x" * 1024)
        assert work.parent == tmp_path
    assert not work.exists()
    with pytest.raises(RuntimeError), build_memory.work_folder(None) as work:
        (work / "bundle").mkdir()
        raise RuntimeError("a build failed")
    assert list(tmp_path.iterdir()) == []
    with build_memory.work_folder(tmp_path / "kept" / "work") as work:
        (work / "bundle").mkdir()
    assert (tmp_path / "kept" / "work" / "bundle").is_dir()


def _interrupt(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    """Start a real run; Ctrl-C its process group (as a terminal does) while its first child (the synthetic
    checkpoint writer) runs, so the work folder exists and the run is inside it."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    proc = subprocess.Popen([sys.executable, str(BENCH / "build_memory.py"), "--layers", "1", *extra],
                            env={**os.environ, "TMPDIR": str(temp)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    deadline = time.monotonic() + 120
    while proc.poll() is None and not children.read_text().strip():
        assert time.monotonic() < deadline, "no child process after 120 s"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.slow  # a build_memory.py process
def test_an_interrupted_run_leaves_no_temp_folder(tmp_path: Path) -> None:
    done = _interrupt(tmp_path)
    assert done.returncode == 130, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == "interrupted"
    assert list((tmp_path / "tmp").iterdir()) == []


@pytest.mark.slow  # a build_memory.py process
def test_an_interrupted_run_keeps_the_work_folder_it_was_given(tmp_path: Path) -> None:
    work = tmp_path / "runs" / "work"  # made by the run
    done = _interrupt(tmp_path, "--work", str(work))
    assert done.returncode == 130 and done.stderr.strip().splitlines()[-1] == f"interrupted: {work} kept"
    assert work.is_dir() and list((tmp_path / "tmp").iterdir()) == []


def test_fp8_source_needs_two_layers(build_memory, capsys) -> None:
    """ltx-core's FP8 files keep block 0 in bf16: a 1-layer FP8 file would hold no float8 weight to measure."""
    assert build_memory.main(["--source", "fp8", "--layers", "1", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --source fp8 needs --layers of 2 or more")


def test_points_are_projected_from_the_family_they_measured(build_memory) -> None:
    """An LTX-2.3 build's points (`--family ltx2.3`) project with its own block size and text head; LTX-2's
    points projected to 2.3 are scaled by the block ratio and priced at LTX-2's measured head."""
    own, other = build_memory.family_scale("ltx2.3", 2, "ltx2.3"), build_memory.family_scale("ltx2.3", 2)
    assert own["dit_block_ratio"] == 1.0 < other["dit_block_ratio"] < 1.01
    assert own["text_head_params"] == other["text_head_params"]  # the full 2.3 head either way
    # measured: the 2.3 head (8 x 4096 gated connector) against LTX-2's (2 x 3840), both on a 2-layer Gemma
    assert own["measured_text_head_params"] > 2 * other["measured_text_head_params"]
