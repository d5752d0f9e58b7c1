"""verify's comparison: our numbers (max_abs_err, rel_l2) and polygraphy's comparator on the same arrays."""

from __future__ import annotations

import numpy as np
import pytest

from stdrc.engines.verify import compare, polygraphy_check


@pytest.fixture()
def ref() -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [{"velocity": rng.standard_normal((b, 18, 8)).astype(np.float32),
             "mask": np.ones((b, 18), np.int64)} for b in (1, 3)]


def _perturbed(ref, rel: float, seed: int = 1):
    rng = np.random.default_rng(seed)
    out = []
    for it in ref:
        v = it["velocity"]
        noise = rng.standard_normal(v.shape).astype(np.float32)
        out.append({**it, "velocity": v + noise * (rel * np.linalg.norm(v) / np.linalg.norm(noise))})
    return out


def test_within_tolerance_passes_both(ref):
    got = _perturbed(ref, 1e-5)
    assert all(compare(g["velocity"], r["velocity"])[1] == pytest.approx(1e-5, rel=1e-2) for g, r in zip(got, ref))
    assert polygraphy_check("dit", got, ref, 1e-4)


def test_rel_l2_bound_implies_polygraphy_pass_and_large_error_fails(ref):
    # rel_l2 just under the tolerance: mean |d| <= RMS(d) <= tol * RMS(ref), so polygraphy agrees
    assert polygraphy_check("dit", _perturbed(ref, 0.9e-4), ref, 1e-4)
    assert not polygraphy_check("dit", _perturbed(ref, 1e-2), ref, 1e-4)


def test_nan_and_wrong_shape_fail(ref):
    nan = [{**it, "velocity": it["velocity"].copy()} for it in ref]
    nan[1]["velocity"][0, 0, 0] = np.nan
    assert not polygraphy_check("dit", nan, ref, 1e-4)
    cut = [{**it, "velocity": it["velocity"][:, :17]} for it in ref]
    assert not polygraphy_check("dit", cut, ref, 1e-4)
    assert compare(cut[0]["velocity"], ref[0]["velocity"]) == (float("inf"), float("inf"))


def test_report_prints_polygraphy_summary(ref, capsys):
    polygraphy_check("dit", _perturbed(ref, 1e-5), ref, 1e-4, report=True)
    out = capsys.readouterr().out
    assert "Accuracy Summary | dit vs. pytorch | Passed: 2/2 iterations" in out
    polygraphy_check("dit", _perturbed(ref, 1e-5), ref, 1e-4)
    assert capsys.readouterr().out == ""
