"""`--help` exits 0 with the help on stdout, and does nothing else, for every command the repo ships:
`stdrc` and `stdrc-export` with each subcommand, the shell scripts, `scripts/*.py` and the benchmarks."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHELL = sorted(str(p.relative_to(ROOT)) for p in [*ROOT.glob("scripts/*.sh"), ROOT / ".ci" / "run"])
PYTHON = sorted(str(p.relative_to(ROOT)) for p in [*ROOT.glob("scripts/*.py"), *ROOT.glob("benchmarks/*.py")]
                if 'if __name__ == "__main__":' in p.read_text())


def _subcommands(parser: argparse.ArgumentParser) -> list[str]:
    (sub,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return list(sub.choices)


@pytest.mark.parametrize("module", ["stdrc.cli", "stdrc.engines.cli"])
def test_every_subcommand_help_exits_0(module: str, capsys: pytest.CaptureFixture) -> None:
    import importlib

    build = importlib.import_module(module).build_parser
    names = _subcommands(build())
    assert len(names) >= 2
    for argv in ([], *([name] for name in names)):
        with pytest.raises(SystemExit) as stop:
            build().parse_args([*argv, "--help"])
        assert stop.value.code == 0, argv
        out = capsys.readouterr()
        assert out.out.startswith("usage: ") and not out.err, argv


@pytest.mark.parametrize("script", SHELL)
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_shell_script_help_exits_0_and_does_nothing(script: str, flag: str, tmp_path: Path) -> None:
    """Run from a copy, with only the tools that printing help needs on PATH: a script that went on past
    --help fails (no python, pip, apt-get or nvidia-smi there) instead of installing anything."""
    copy = tmp_path / script
    copy.parent.mkdir(parents=True)
    shutil.copy(ROOT / script, copy)
    tools = tmp_path / "bin"
    tools.mkdir()
    for tool in ("awk", "dirname"):
        (tools / tool).symlink_to(shutil.which(tool))
    args = ["OUT", flag] if script.endswith("gpu_check.sh") else [flag]  # help wins wherever it appears
    proc = subprocess.run([shutil.which("bash"), str(copy), *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60, env={"PATH": str(tools), "HOME": str(tmp_path)})
    assert proc.returncode == 0 and not proc.stderr, proc.stderr
    assert len(proc.stdout.splitlines()) >= 2 and not proc.stdout.startswith("#!")
    assert {p.name for p in tmp_path.iterdir()} == {"bin", script.split("/")[0]}  # it wrote nothing


@pytest.mark.parametrize("script", PYTHON)
def test_python_script_help_exits_0(script: str) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / script), "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage: ")


def test_the_lists_are_not_empty() -> None:
    assert "scripts/gpu_check.sh" in SHELL and ".ci/run" in SHELL
    assert {"benchmarks/build_memory.py", "scripts/cli_docs.py"} <= set(PYTHON)
