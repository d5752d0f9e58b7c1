"""Smoke tests of benchmarks/: both scripts run on tiny CPU and print well-formed JSON.

No timing thresholds: only structure, positive finite numbers, the baseline's ratio of 1, and
that the backends compared compute the same thing (values, not speed).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
pytestmark = pytest.mark.slow  # ~45 s on 2 CPU cores: three ONNX exports, a bundle build, FP8 calibrations
pytest.importorskip("torch")
pytest.importorskip("ltx_core")
HAS_MODELOPT = importlib.util.find_spec("modelopt") is not None
# torch-export, aoti: slower builds. stdrc-fp8 calibrates its scales with modelopt (a few seconds).
DIT_BACKENDS = ["ltx-eager", "ltx-eager-bf16", "stdrc-torch", "stdrc-bf16", "stdrc-fp8", "onnxruntime",
                "onnxruntime-unfused", "tensorrt"]


@pytest.fixture(scope="module")
def scripts():
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module("dit_step"), importlib.import_module("generate")
    finally:
        sys.path.remove(str(BENCH))


def run_json(module, argv: list[str]) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert module.main([*argv, "--json"]) == 0
    return json.loads(out.getvalue())


@pytest.fixture(scope="module")
def cache(cache_dir: Path) -> Path:
    """The session's stage cache (tests/conftest.py): the tiny bundle built here and the shared `tiny_bundle`
    are the same build, so whichever runs second exports nothing."""
    return cache_dir


@pytest.fixture(scope="module")
def dit_report(scripts, cache) -> dict:
    dit_step, _ = scripts
    argv = ["--repeats", "2", "--warmup", "1", "--cache-dir", str(cache), "--backends", *DIT_BACKENDS]
    return run_json(dit_step, argv)


@pytest.fixture(scope="module")
def bundle(scripts, cache, dit_report, tmp_path_factory) -> Path:
    """Built after dit_step, sharing its cache: the exported dit.onnx is reused."""
    _, generate = scripts
    out = tmp_path_factory.mktemp("bundle") / "tiny"
    assert generate.build_tiny_bundle(out, "onnxruntime", cache) > 0
    return out


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_dit_step_json(dit_report):
    rep = dit_report
    assert {"device", "preset", "config", "versions", "backends"} <= set(rep)
    assert rep["preset"] == "tiny" and rep["device"]["kind"] == "cpu"
    c = rep["config"]
    assert c["batch"] == 3 and c["tokens"] == c["video_tokens"] + c["reference_tokens"]
    assert c["repeats"] == 2 and c["dtype"] == "float32" and positive(c["flops_per_step"])
    assert {"torch", "onnxruntime", "ltx-core", "tensorrt"} <= set(rep["versions"])
    rows = {r["name"]: r for r in rep["backends"]}
    assert list(rows) == DIT_BACKENDS
    if not HAS_MODELOPT:  # no scales to calibrate with: skipped, saying why
        assert rows.pop("stdrc-fp8")["reason"].startswith("calibrating FP8 scales needs nvidia-modelopt")
    for name in ("ltx-eager", "ltx-eager-bf16", "stdrc-torch", "stdrc-bf16", "stdrc-fp8", "onnxruntime"):
        if name not in rows:
            continue
        r = rows[name]
        assert r["status"] == "ok", r["reason"]
        for key in ("ms_per_step", "ms_min", "ratio_to_baseline", "speedup", "ratio_to_ltx_bf16",
                    "tokens_per_s", "tflops", "peak_mem_mb"):
            assert positive(r[key]), (name, key, r[key])
        assert len(r["times_ms"]) == 2 and r["ms_min"] <= r["ms_median"]
        assert r["pct_of_peak"] is None  # no known peak for a CPU
    for name in ("ltx-eager", "stdrc-torch", "onnxruntime", "onnxruntime-unfused"):  # same computation, fp32
        assert rows[name]["precision"] == "fp32"
        assert rows[name]["max_abs_diff"] < 1e-4 and rows[name]["rel_l2"] < 1e-5, rows[name]
    for name in ("onnxruntime", "onnxruntime-unfused"):  # the runtime's own loop over the engine
        sm = rows[name]["sampler"]
        assert sm["steps"] >= 2 and positive(sm["step_ms"]) and 0 <= sm["outside_engine_pct_of_step"] < 100
    for name in ("ltx-eager-bf16", "stdrc-bf16", "stdrc-fp8")[:3 if HAS_MODELOPT else 2]:  # close (~7e-3)
        assert rows[name]["precision"] in ("bf16", "fp8")
        assert 1e-4 < rows[name]["rel_l2"] < 3e-2, rows[name]
    assert rows["ltx-eager"]["ratio_to_baseline"] == 1.0
    assert rows["ltx-eager-bf16"]["ratio_to_ltx_bf16"] == 1.0
    fast = rep["config"]["fast_path"]
    assert fast["cuda_graph"] is False
    assert not HAS_MODELOPT or fast["fp8_scales"].startswith("calibrated here")
    kernels = {"self_attention_key_bias", "self_attention_no_mask", "cross_attention_text_bias"}
    assert set(fast["sdpa_bf16"]) == kernels
    assert rows["tensorrt"]["status"] in ("skipped", "failed", "ok")
    if rows["tensorrt"]["status"] != "ok":
        assert rows["tensorrt"]["reason"]


def test_flops_formula(scripts):
    dit_step, _ = scripts
    p = dit_step.ParamCounts(token=10, text=3, block_token=100, block_text=7)
    flops = dit_step.dit_flops(p, layers=2, heads=4, head_dim=8, batch=3, tokens=5, text_length=6)
    linear = 2 * 3 * (5 * (10 + 2 * 100) + 6 * (3 + 2 * 7))
    attention = 2 * (4 * 3 * 4 * 5**2 * 8 + 4 * 3 * 4 * 5 * 6 * 8)
    assert flops == linear + attention


def test_generate_stages_json(scripts, bundle):
    _, generate = scripts
    rep = run_json(generate, ["--bundle", str(bundle), "--repeats", "2"])
    assert {"device", "preset", "config", "versions", "bundle", "stages_ms", "total_ms", "memory"} <= set(rep)
    assert rep["mode"] == "stages" and rep["preset"] == "tiny"
    stages = {"text", "reference_prep", "reference_encode", "sampling", "decode", "write"}
    assert set(rep["stages_ms"]) == stages
    for t in [*rep["stages_ms"].values(), rep["total_ms"]]:
        assert len(t["all"]) == 2 and all(positive(x) for x in t["all"]) and t["min"] <= t["median"]
    assert rep["dit"]["dit_calls"] == rep["dit"]["steps"] == rep["config"]["steps"]  # 3 streams, one call
    assert positive(rep["memory"]["peak_rss_mb"])


def test_generate_two_stage_json(scripts, cache):
    """--stages 1 2: both tiny bundles built (the two-stage one from upsampler and LoRA files), each stage count
    timed on the two-stage bundle, DiT calls counted at their grids, the bytes check and the projection."""
    _, generate = scripts
    rep = run_json(generate, ["--stages", "1", "2", "--repeats", "1", "--warmup", "0", "--bucket", "9x128x64",
                              "--steps", "3", "--cache-dir", str(cache)])
    assert rep["mode"] == "two_stage" and rep["config"]["stages"] == [1, 2] and rep["config"]["steps"] == 3
    one, two = rep["two_stage"]["stages"]["1"], rep["two_stage"]["stages"]["2"]
    assert one["frames_shape"] == two["frames_shape"] == [9, 64, 128, 3]
    steps = rep["config"]["steps"]
    assert one["dit_calls"] == {"dit": {"count": steps, "batch_tokens_text": [[3, 2 * 2 * 4 + 8, 16]]}}
    assert two["dit_calls"] == {"dit": {"count": steps, "batch_tokens_text": [[3, 2 * 1 * 2 + 2, 16]]},
                                "dit_refine": {"count": 3, "batch_tokens_text": [[1, 2 * 2 * 4 + 8, 16]]}}
    assert set(two["engine_ms"]) >= {"dit", "upsampler", "dit_refine", "vae_decoder"}
    assert "upsampler" not in one["engine_ms"]
    assert len(one["load_1min"]) == len(two["load_1min"]) == len(one["wall_ms"]["all"]) == 1  # after each timed one
    assert rep["two_stage"]["ratios"]["dit_flops_one_over_two"] > 1 and rep["two_stage"]["ratios"]["same_output_shape"]
    b = rep["two_stage"]["bytes"]
    assert b["two_stage"] - b["one_stage"] == b["added"] > 0 and b["passed"] and b["limit"] > b["two_stage"]
    p = rep["two_stage"]["projection"]
    assert (p["tokens"], p["stage1_tokens"], p["layers"]) == (6528, 1632, 48) and 3.5 < p["ratio"] < 4


def test_generate_repeat_json(scripts, bundle):
    _, generate = scripts
    rep = run_json(generate, ["--bundle", str(bundle), "--repeat-generations", "5", "--steps", "2"])
    r = rep["repeat"]
    assert rep["mode"] == "repeat" and r["generations"] == 5 and len(r["rss_mb"]) == 5
    assert all(positive(x) for x in r["rss_mb"]) and r["first_mb"] == r["rss_mb"][0]
    assert math.isfinite(r["slope_mb_per_generation"])
    assert r["same_seed_identical_frames"] is True  # seed 0 again after 5 generations: the same bytes
    # flat RSS: after the first generation (arenas, caches), under 20 MB more for 4 more generations
    assert r["rss_mb"][-1] - r["rss_mb"][1] < 20, r["rss_mb"]


@pytest.mark.skipif(not HAS_MODELOPT, reason="the gate calibrates FP8 scales with nvidia-modelopt")
def test_generate_fast_path_gate_json(scripts, bundle):
    """bf16 and FP8 fast path swapped in for the bundle's DiT: same seed, frame PSNR, the FP8 gate."""
    _, generate = scripts
    rep = run_json(generate, ["--bundle", str(bundle), "--fast-path-gate", "--steps", "2", "--warmup", "0",
                              "--repeats", "1", "--fp8-calibration-prompts", "1"])
    f = rep["fast_path"]
    assert rep["mode"] == "fast_path" and list(f["variants"]) == ["engine", "bf16", "fp8"]
    for row in f["variants"].values():
        assert positive(row["sampling_ms"]["median"]) and row["dit_calls"] == 2
    for name in ("bf16", "fp8"):  # close to the fp32 engine, not identical (inf would mean fp32 ran)
        assert 25 < f["variants"][name]["frame_psnr_db_vs_engine"] < 200
    g = f["gate"]
    assert g["passed"] and 25 < g["psnr_db"] < 200 and g["min_db"] == 30.0
    assert f["fp8_scales"].startswith("calibrated here")


def test_staged_generation_equals_generate(scripts, bundle, tmp_path):
    """The stage split times what `Pipeline.generate` computes, not something else."""
    from stdrc.runtime.pipeline import Pipeline

    _, generate = scripts
    pipe = Pipeline.from_bundle(bundle)
    reference = generate.synthetic_reference(0)
    cfg = generate.GenerateConfig(steps=3)
    _, _, staged = generate.staged_generation(pipe, reference, "a prompt", 5, cfg, tmp_path / "a.mp4")
    direct = pipe.generate(reference, prompt="a prompt", seed=5, steps=3, face_crop=False)
    np.testing.assert_array_equal(staged.frames, direct.frames)
    assert (tmp_path / "a.mp4").is_file()


def test_runtime_memory_json(bundle):
    sys.path.insert(0, str(BENCH))
    try:
        runtime_memory = importlib.import_module("runtime_memory")
    finally:
        sys.path.remove(str(BENCH))
    rep = runtime_memory.run(bundle, "cpu")
    plans = rep["plans"]
    assert set(plans) == {"all", "staged"} and rep["identical_frames"]
    for modes in plans.values():
        for r in modes.values():
            assert r["status"] == "ok", r and positive(r["peak_rss_mb"])
    assert plans["staged"]["cached_prompt"]["text_opened"] == []
    assert plans["staged"]["uncached_prompt"]["text_opened"] == ["text_gemma", "text_head"]
    p = rep["projected"]
    assert 12e9 < p["parameters"]["dit"] < 14e9 and 11e9 < p["parameters"]["gemma3_12b_text"] < 13e9
    g = p["projected_gpu_gb"]
    assert g["fp8_staged_cached_prompt"] < g["fp8_staged"] <= g["fp16_staged"] < g["fp16_all"]


@pytest.mark.slow  # three tiny exports and three child processes
def test_text_engines_json() -> None:
    """benchmarks/text_engines.py on a tiny text side: one engine and two give the same context, and what
    crosses is every hidden state, fp32 here (16 tokens x 32 wide)."""
    sys.path.insert(0, str(BENCH))
    try:
        text_engines = importlib.import_module("text_engines")
    finally:
        sys.path.remove(str(BENCH))
    rep = run_json(text_engines, ["--preset", "tiny", "--layers", "2", "--length", "16", "--repeats", "1", "--json"])
    assert rep["context_rel_l2_two_vs_one"] <= 1e-6
    assert rep["states_crossing_mb"] * 2**20 == 3 * 16 * 32 * 4
    for name in ("one_engine", "text_gemma", "text_head"):
        assert rep[name]["weights_mb"] > 0 and rep[name]["min_s"] > 0
    assert rep["one_engine"]["weights_mb"] == pytest.approx(rep["text_gemma"]["weights_mb"]
                                                            + rep["text_head"]["weights_mb"], rel=0.05)
