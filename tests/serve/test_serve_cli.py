"""`stdrc serve` / `stdrc submit` refuse bad arguments with one `error:` line before starting anything."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from stdrc.runtime.cli import main

pytest.importorskip("ray.serve")


def _error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    return err[0]


def test_serve_refuses_a_missing_bundle_and_bad_numbers(capsys, tmp_path: Path, tiny_bundle: Path):
    assert "bundle" in _error(capsys, ["serve", "--bundle", str(tmp_path / "nope")]).lower()
    for flags, word in ((["--replicas", "0"], "--replicas"), (["--port", "0"], "--port"),
                        (["--max-queue", "-1"], "--max-queue"), (["--keep", "0"], "--keep"),
                        (["--cpus-per-replica", "0"], "--cpus-per-replica")):
        assert word in _error(capsys, ["serve", "--bundle", str(tiny_bundle), *flags])


def test_submit_says_when_no_server_answers(capsys, tmp_path: Path, astronaut_png: Path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    line = _error(capsys, ["submit", "--server", f"http://127.0.0.1:{port}", "--ref", str(astronaut_png),
                           "--prompt", "a", "-o", str(tmp_path / "out.mp4")])
    assert "cannot reach" in line and "stdrc serve" in line
    assert not (tmp_path / "out.mp4").exists()
