"""Optional dependencies skip only the tests that need them: without modelopt, bf16/SDPA and data tests still run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# modelopt made unimportable, as on a machine without the `fp8` extra
NO_MODELOPT = "import sys, pytest; sys.modules['modelopt'] = None; sys.exit(pytest.main(sys.argv[1:]))"


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
