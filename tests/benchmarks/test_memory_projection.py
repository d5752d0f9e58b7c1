"""The full-model memory projections per family (issue 26): `--family ltx2.3` runs in projection mode
(parameters counted on the meta device, nothing allocated; build memory from the recorded LTX-2 points)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"


@pytest.fixture(scope="module")
def runtime_memory():
    sys.path.insert(0, str(BENCH))
    try:
        import runtime_memory

        yield runtime_memory
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def projections(runtime_memory) -> dict[str, dict]:
    return {f: runtime_memory.projected(family=f) for f in ("ltx2", "ltx2.3")}


def test_ltx23_counts_its_own_architecture(projections) -> None:
    two, three = projections["ltx2"]["parameters"], projections["ltx2.3"]["parameters"]
    assert projections["ltx2.3"]["family"] == "ltx2.3"
    # gated attention and the prompt AdaLN add to each block; the 8-layer 4096-wide connector to the head
    assert three["dit_block"] > two["dit_block"] and three["dit"] > two["dit"]
    assert three["text_head"] > 2 * two["text_head"] > 0
    assert three["gemma3_12b_text"] == two["gemma3_12b_text"]
    assert three["vae_encoder"] != two["vae_encoder"]  # LTX-2.3's own VAE


@pytest.mark.parametrize("family", ["ltx2", "ltx2.3"])
def test_gemma_and_its_head_are_stages_of_their_own(projections, family) -> None:
    """The FP8 DiT staged plan peaks at Gemma's stage, the head apart: within 24 GiB for both families."""
    p = projections[family]
    w, a, g = p["weights_gib"]["fp8"], p["activations_gib"], p["projected_gpu_gb"]
    fixed = p["session_gib"] + p["context_gib"]
    stage = {c: w[c] + a[c] + fixed for c in ("text_gemma", "text_head", "dit", "vae_decoder")}
    assert g["fp8_staged"] == pytest.approx(max(stage.values())) == pytest.approx(stage["text_gemma"])
    assert stage["text_head"] < stage["dit"] < stage["text_gemma"] < 24
    assert g["fp8_staged_cached_prompt"] < g["fp8_staged"] < g["fp16_all"]
    n = p["parameters"]
    assert w["text_gemma"] == pytest.approx(2 * n["gemma3_12b_text"] / 2**30)
    assert w["text_head"] == pytest.approx(2 * n["text_head"] / 2**30)
    # both hold the hidden states that cross between them (49 x 1024 x 3840, fp16) once
    states = 49 * 1024 * 3840 * 2 / 2**30
    assert a["text_gemma"] > states and a["text_head"] > states


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH / "build_memory.py"), *args], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)


def test_build_memory_projects_ltx23_from_recorded_points() -> None:
    reports = {}
    for family in ("ltx2", "ltx2.3"):
        out = _run("--family", family, "--points", "docs/build_memory_fp16.json", "--json")
        assert out.returncode == 0, out.stderr
        reports[family] = json.loads(out.stdout)
    two, three = reports["ltx2"]["projected"], reports["ltx2.3"]["projected"]
    assert three["dit_block_ratio"] > 1.0 == two["dit_block_ratio"]
    assert three["dit_peak_rss_gb_per_layer"] == pytest.approx(two["dit_peak_rss_gb_per_layer"]
                                                               * three["dit_block_ratio"])
    assert three["per_component_peak_rss_gb"]["text_encoder"] > two["per_component_peak_rss_gb"]["text_encoder"]
    assert three["peak_rss_gb"] == max(three["per_component_peak_rss_gb"].values())


def test_build_memory_projects_ltx23_from_its_own_points() -> None:
    """The measured 2.3 points (docs/build_memory_ltx23_fp16.json, docs/benchmarks.md): projected with their own
    family's block (no LTX-2 scaling), two text engines, the peak within issue 26's 32 GB build target."""
    out = _run("--family", "ltx2.3", "--points", "docs/build_memory_ltx23_fp16.json", "--json")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)["projected"]
    assert got["measured_family"] == "ltx2.3" and got["dit_block_ratio"] == 1.0
    assert {"text_gemma", "text_head"} <= set(got["per_component_peak_rss_gb"])
    assert "text_encoder" not in got["per_component_peak_rss_gb"]
    assert got["peak_rss_gb"] == max(got["per_component_peak_rss_gb"].values()) <= 32


def test_build_memory_refuses_what_it_cannot_project() -> None:
    """A --points report that is not there: one error line naming the flag (`--family ltx2.3` alone builds 2.3)."""
    out, needle = _run("--points", "no-such-report.json"), "--points"
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith("error:") and needle in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_build_memory_projects_split_text_engines() -> None:
    """Points from a build after the split (text_gemma and text_head recorded apart): each engine's peak grows
    by its own missing weights (Gemma's to 12B, the head's to the full head), no one-engine entry."""
    sys.path.insert(0, str(BENCH))
    try:
        import build_memory
    finally:
        sys.path.remove(str(BENCH))
    points = json.loads((ROOT / "docs" / "build_memory_fp16.json").read_text())["points"]
    for p in points:  # the recorded one-engine point, as two engines of the same measured footprint
        one = p["components"].pop("text_encoder")
        p["components"]["text_gemma"] = one
        p["components"]["text_head"] = {"peak_rss_gb": 1.0, "disk_gb": 0.5}
    scale = {"dit_block_ratio": 1.0, "text_head_params": 3e8, "measured_text_head_params": 1e8}
    report = build_memory.project(points, "fp16", 5e8, scale)
    got, rate = report["per_component_peak_rss_gb"], report["rss_per_weight_byte"]
    gemma_bytes = (build_memory.GEMMA_12B_PARAMS - 5e8) * 2 / build_memory.GB
    assert "text_encoder" not in got
    assert got["text_gemma"] == pytest.approx(points[-1]["components"]["text_gemma"]["peak_rss_gb"]
                                              + rate * gemma_bytes)
    assert got["text_head"] == pytest.approx(1.0 + rate * 2e8 * 2 / build_memory.GB)
