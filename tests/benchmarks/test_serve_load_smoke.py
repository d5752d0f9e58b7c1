"""Smoke test of benchmarks/serve_load.py: 1 and 2 replicas on tiny CPU give a well-formed report.

No timing thresholds: structure, positive finite rates, and the ratio being the medians' ratio.
"""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
pytestmark = pytest.mark.slow  # one local Ray node, two deployments: about a minute on 2 cores
pytest.importorskip("ray.serve")
pytest.importorskip("multipart")


def test_serve_load_reports_both_replica_counts(tiny_bundle, astronaut_png, tmp_path):
    sys.path.insert(0, str(BENCH))
    try:
        serve_load = importlib.import_module("serve_load")
    finally:
        sys.path.remove(str(BENCH))
    out = tmp_path / "report.json"
    assert serve_load.main(["--bundle", str(tiny_bundle), "--reference", str(astronaut_png), "--jobs", "2",
                            "--repeats", "1", "--object-store-mb", "200", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["config"]["jobs"] == 2 and report["versions"]["ray"]
    rows = {r["replicas"]: r for r in report["rows"]}
    assert set(rows) == {1, 2}
    for row in rows.values():
        assert len(row["seconds"]) == 1 and row["seconds"][0] > 0
        jpm = row["jobs_per_min"]["median"]
        assert math.isfinite(jpm) and jpm == pytest.approx(2 / row["seconds"][0] * 60, rel=0.01)
    ratio = rows[2]["jobs_per_min"]["median"] / rows[1]["jobs_per_min"]["median"]
    assert report["scaling_ratio_2_over_1"] == pytest.approx(ratio, abs=1e-3)
