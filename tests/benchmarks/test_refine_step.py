"""Smoke test of benchmarks/refine_step.py on tiny: well-formed JSON, byte accounting that adds up, both engines
timed, the refinement really differs from the base. No timing thresholds."""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
pytestmark = pytest.mark.slow  # one tiny DiT export and engine build (~20 s)


def test_refine_step_reports_bytes_and_times():
    sys.path.insert(0, str(BENCH))
    try:
        module = importlib.import_module("refine_step")
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert module.main(["--repeats", "2", "--warmup", "1", "--json"]) == 0
    finally:
        sys.path.remove(str(BENCH))
    report = json.loads(out.getvalue())
    b = report["bytes"]
    assert report["lora"]["rank"] == 4 and report["lora"]["targets"] > 0 and report["lora"]["file_bytes"] > 0
    assert b["refine_added"] == b["refine_graph"] + b["refine_lora_data"]
    assert b["refine_lora_data"] <= 1.05 * report["lora"]["file_bytes"] < b["dit_weights"]
    assert math.isclose(b["added_over_lora"], b["refine_added"] / report["lora"]["file_bytes"], rel_tol=1e-3)
    for name in ("dit", "dit_refine"):
        t = report["step_ms"][name]
        assert len(t["all"]) == 2 and 0 < t["min"] <= t["median"]
    assert report["refine_vs_base_rel_l2"] > 1e-2
