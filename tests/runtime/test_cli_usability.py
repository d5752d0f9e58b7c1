"""The CLIs as people expect them: --version, help and defaults on every option, --device auto,
--face-detector, and a progress bar that starts only after the arguments are checked."""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import onnxruntime as ort
import pytest

import stdrc
from stdrc.runtime import face
from stdrc.runtime.backends import resolve_device
from stdrc.runtime.errors import InputError


def _run(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("module,prog", [("stdrc.cli", "stdrc"), ("stdrc.engines.cli", "stdrc-export")])
def test_version(module: str, prog: str) -> None:
    proc = _run(module, "--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"{prog} {stdrc.__version__}"
    assert importlib.metadata.version("stdrc") == stdrc.__version__  # one version, from stdrc/__init__.py


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (sub,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


@pytest.mark.parametrize("module", ["stdrc.cli", "stdrc.engines.cli"])
def test_every_option_has_help_and_shows_its_default(module: str) -> None:
    parser = importlib.import_module(module).build_parser()
    assert parser.description and not parser.description.startswith("`")
    for name, sub in _subcommands(parser).items():
        assert sub.description, name
        text = sub.format_help()
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, (name, action.dest)
            shown = action.default not in (None, False) and not action.required and action.option_strings
            if shown:  # e.g. --seed (default: 0), --device (default: auto)
                formatted = sub._get_formatter()._get_help_string(action) % {"default": action.default}
                assert "default" in formatted, (name, action.dest)
        assert "(default: None)" not in text and "(default: False)" not in text, name


def test_stdrc_assembles_every_subcommand_whatever_is_installed() -> None:
    """No subcommand hides behind a failed import: serve, submit and app are listed without their extras."""
    from stdrc.cli import build_parser

    assert list(_subcommands(build_parser())) == ["generate", "encode-prompts", "plan", "facesim", "serve",
                                                  "submit", "app"]
    proc = _run("stdrc", "--version")  # python -m stdrc
    assert proc.returncode == 0 and proc.stdout.strip() == f"stdrc {stdrc.__version__}"


def test_device_auto_follows_what_the_backend_can_use(caplog: pytest.LogCaptureFixture) -> None:
    has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    with caplog.at_level(logging.INFO, logger="stdrc.runtime.backends"):
        assert resolve_device("auto", {"onnxruntime"}) == ("cuda" if has_cuda else "cpu")
    (record,) = caplog.records
    assert record.getMessage().startswith(f"device auto -> {'cuda' if has_cuda else 'cpu'} (onnxruntime has")
    assert resolve_device("cpu", {"onnxruntime"}) == "cpu"  # explicit choices are taken as they are
    with pytest.raises(InputError, match="--device auto, cpu or cuda"):
        resolve_device("gpu", {"onnxruntime"})


def _generate(bundle: Path, ref: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return _run("stdrc.cli", "generate", "--bundle", str(bundle), "--ref", str(ref), "--prompt", "x",
                "-o", str(out), *extra)


def test_bar_only_after_checks_and_never_on_the_error_line(tiny_bundle: Path, astronaut_png: Path,
                                                           tmp_path: Path) -> None:
    bad = _generate(tiny_bundle, astronaut_png, tmp_path / "bad.mp4", "--steps", "0")
    assert bad.returncode == 2
    lines = bad.stderr.splitlines()
    assert "sampling" not in bad.stderr and "\r" not in bad.stderr, bad.stderr
    assert [line for line in lines if not line.startswith("INFO stdrc.runtime.backends: device auto")] == [
        "error: steps=0: use --steps 1 to 1000"]
    good = _generate(tiny_bundle, astronaut_png, tmp_path / "good.mp4", "--steps", "2")
    assert good.returncode == 0, good.stderr
    assert "sampling" in good.stderr and "2/2" in good.stderr  # the bar ran, with its total known
    assert sum("device auto -> " in line for line in good.stderr.splitlines()) == 1
    assert good.stdout.startswith(f"wrote {tmp_path / 'good.mp4'}")


def test_face_detector_option(tiny_bundle: Path, astronaut_png: Path, tmp_path: Path) -> None:
    missing = _generate(tiny_bundle, astronaut_png, tmp_path / "a.mp4", "-q", "--face-detector",
                        str(tmp_path / "yunet.onnx"))
    assert missing.returncode == 2 and missing.stderr.strip().startswith("error: YuNet file ")
    assert str(tmp_path / "yunet.onnx") in missing.stderr and not (tmp_path / "a.mp4").exists()
    own = shutil.copy(face.packaged_yunet(), tmp_path / "my-yunet.onnx")
    done = _generate(tiny_bundle, astronaut_png, tmp_path / "b.mp4", "-q", "--json", "--steps", "1",
                     "--face-detector", str(own))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["frames"] == 9
