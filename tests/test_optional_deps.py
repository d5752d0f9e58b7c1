"""Optional dependencies skip only the tests that need them: without modelopt, bf16/SDPA and data tests still run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# modelopt made unimportable, as on a machine without the `fp8` extra
NO_MODELOPT = "import sys, pytest; sys.modules['modelopt'] = None; sys.exit(pytest.main(sys.argv[1:]))"


@pytest.mark.slow  # a pytest process
def test_without_modelopt_only_modelopt_tests_skip(tmp_path: Path) -> None:
    runs = ["tests/export/test_fast_path.py::test_fp8_linear_needs_gemm_friendly_shapes",
            "tests/export/test_fast_path.py::test_bad_scale_files",  # needs calibrated scales: skips
            "tests/calibration/test_fp8.py::test_quantize_needs_batches",
            "tests/calibration/test_fp8.py::test_scales_positive_finite"]  # needs a quantized DiT: skips
    report = tmp_path / "report.txt"
    proc = subprocess.run([sys.executable, "-c", NO_MODELOPT, "-q", "-rA", "-p", "no:cacheprovider",
                           "--basetemp", str(tmp_path / "t"), *runs], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    report.write_text(proc.stdout)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0, proc.stdout[-3000:]
    for run in runs[0], runs[2]:
        assert any(line.startswith("PASSED") and run in line for line in lines), proc.stdout[-3000:]
    skipped = [line for line in lines if line.startswith("SKIPPED")]
    assert len(skipped) == 2 and all("nvidia-modelopt" in line for line in skipped), proc.stdout[-3000:]


# a `stdrc` command run with one package made unimportable, as on a machine without its extra
WITHOUT = ("import sys; sys.modules[sys.argv[1]] = None\n"
           "from stdrc.cli import main; sys.exit(main(sys.argv[2:]))")


@pytest.mark.parametrize("package,extra,argv", [
    ("ray", "serve", ["serve", "--bundle", "nowhere"]),
    ("requests", "serve", ["submit", "--ref", "a.png", "--prompt", "p", "-o", "out.mp4"]),
    ("gradio", "app", ["app", "--bundle", "nowhere"]),
    ("requests", "app", ["app", "--bundle", "nowhere", "--server", "http://127.0.0.1:9"]),
])
def test_a_missing_extra_is_one_line_naming_it(package: str, extra: str, argv: list[str],
                                               tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", WITHOUT, package, *argv], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and package in lines[0]
    assert f'pip install "stdrc[{extra}]"' in lines[0]


def test_a_broken_import_inside_an_extra_is_not_called_missing(tmp_path: Path) -> None:
    """Only the package itself being absent is a missing extra: an ImportError from inside it propagates."""
    (tmp_path / "gradio").mkdir()
    (tmp_path / "gradio" / "__init__.py").write_text("import no_such_module_inside_gradio\n")
    code = "from stdrc.runtime.errors import require_extra; require_extra('gradio', 'app', 'x')"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 1 and "no_such_module_inside_gradio" in proc.stderr
    assert "pip install" not in proc.stderr
