"""scripts/gpu_check.sh: the parts a CPU machine can check (arguments, the wheel list, the dry run)."""

from __future__ import annotations

import json
import subprocess
from importlib.metadata import version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
WHEEL_LIST = ROOT / "scripts" / "gpu_wheels.txt"


def listed() -> list[tuple[str, str]]:
    pins = []
    for line in WHEEL_LIST.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, pin = line.partition("==")
            pins.append((name, pin))
    return pins


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT, timeout=60)


def test_wheel_list_pins_what_this_project_installs():
    """The carried wheels are the versions CI tests with: a bumped dependency must bump the list."""
    pins = listed()
    assert {"ltx-core", "nvidia-modelopt", "imageio-ffmpeg"} <= {n for n, _ in pins}
    assert all(pin and version(name) == pin for name, pin in pins), [(n, p, version(n)) for n, p in pins]


def test_dry_run_reports_missing_wheels_and_the_plan(tmp_path):
    result = run(str(tmp_path / "out"), "--wheels", str(tmp_path / "none"), "--layers", "2", "--dry-run")
    assert result.returncode == 0, result.stderr
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert plan["layers"] == 2 and plan["steps"][:3] == ["facts", "pytest_gpu", "dit_step"]
    assert len(plan["missing_wheels"]) == len(listed()) + 1  # + stdrc's own wheel


def test_dry_run_finds_wheels_by_their_file_names(tmp_path):
    wheels = tmp_path / "whl"
    wheels.mkdir()
    for name, pin in listed():
        (wheels / f"{name.replace('-', '_')}-{pin}-py3-none-any.whl").touch()
    (wheels / "stdrc-0.1.0-py3-none-any.whl").touch()
    assert run(str(tmp_path / "out"), "--wheels", str(wheels), "--dry-run").returncode == 0
    assert json.loads((tmp_path / "out" / "plan.json").read_text())["missing_wheels"] == []


@pytest.mark.parametrize("args", [[], ["--dry-run"], ["OUT", "--layers", "0"], ["OUT", "--layers", "x"],
                                  ["OUT", "--bogus"], ["OUT", "--wheels"]])
def test_bad_arguments_exit_2_with_one_line(tmp_path, args):
    args = [str(tmp_path / "o") if a == "OUT" else a for a in args]
    result = run(*args)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert 1 <= len(result.stderr.strip().splitlines()) <= 2  # the error, then the usage line


def test_a_real_run_refuses_missing_wheels_before_anything_heavy(tmp_path):
    result = run(str(tmp_path / "out"), "--wheels", str(tmp_path / "none"))
    assert result.returncode == 2 and "wheels missing" in result.stderr
    assert not (tmp_path / "out" / "summary.json").exists()
