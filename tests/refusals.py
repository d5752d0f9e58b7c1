"""One check for "build-engines refuses this checkpoint in one line, exit 2, before any tensor is read"."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from stdrc.export import checkpoint


def assert_build_refused_before_any_read(bad: Path, tmp_path: Path, message: str,
                                         monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
                                         args: tuple[str, ...] = ("--backend", "onnxruntime")) -> None:
    """`build-engines --checkpoint bad`: one `error:` line matching `message`, exit 2, no tensor read (the
    reader is replaced by one that fails the test), no bundle folder."""
    from stdrc.engines.cli import main

    reads = []

    def no_read(fh, base, info):
        reads.append(info)
        raise AssertionError("a tensor was read")

    monkeypatch.setattr(checkpoint, "_read_tensor", no_read)
    out = tmp_path / "bundle"
    rc = main(["build-engines", "--preset", "tiny", "--checkpoint", str(bad), *args,
               "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert re.search(message, err[0]), err[0]
    assert not reads and not out.exists()
