"""FP8 figures for the manifest: calibration on DiT inputs captured through the PyTorch sampler."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from stdrc.calibration.fp8 import fp8_dit_error
from stdrc.calibration.report import calibrate_dit_fp8, fp8_quality, held_out_generation, torch_pipeline
from stdrc.export.errors import ExportError
from stdrc.runtime.manifest import Bucket, sha256_file
from stdrc.runtime.pipeline import Pipeline
from stdrc.runtime.video import frames_to_uint8


@pytest.mark.slow  # calibration and two generations
def test_fp8_quality_is_measured_held_out_and_written(tiny_models, tmp_path: Path) -> None:
    bucket = Bucket(**tiny_models.preset.default_bucket)
    result = fp8_quality(tiny_models, bucket, "tass", tmp_path, calibration_prompts=2)
    steps = tiny_models.preset.steps
    assert result.calibration_batches == 2 * steps  # one captured DiT batch per sampling step
    assert 1e-4 < result.dit_rel_l2_held_out < 0.05  # FP8 is lossy, but not broken
    assert math.isfinite(result.frame_psnr_db_held_out) and result.frame_psnr_db_held_out > 25
    # the figure is measured on DiT inputs that calibration never saw
    qdit, captured = calibrate_dit_fp8(tiny_models, bucket, "tass", 2)
    photo, prompt, seed, _ = held_out_generation(2)
    pipe = torch_pipeline(tiny_models, bucket, "tass", record=True)
    pipe.generate(photo, prompt=prompt, seed=seed)
    held = pipe.engines["dit"].recorded
    assert len(held) == steps and f"{steps} DiT batches" in result.held_out
    assert not any(torch.equal(h["latent"], c["latent"]) or torch.equal(h["context"][2], c["context"][2])
                   for h in held for c in captured)
    assert result.dit_rel_l2_held_out == pytest.approx(fp8_dit_error(tiny_models.dit, qdit, held), rel=1e-6)
    with pytest.raises(ExportError, match="kept back"):
        held_out_generation(99)
    scales = json.loads((tmp_path / result.scales_file).read_text())
    assert scales and all(v > 0 and math.isfinite(v) for v in scales.values())
    assert any(k.endswith(".input_scale") for k in scales) and any(k.endswith(".weight_scale") for k in scales)
    assert not any(k.startswith(("ltx.patchify_proj", "ltx.proj_out")) for k in scales)  # kept in high precision
    assert sha256_file(tmp_path / result.scales_file) == result.scales_sha256


@pytest.mark.slow  # three tiny generations
def test_held_out_frames_are_the_runtimes(tiny_models, tiny_bundle: Path) -> None:
    """The report generates through the runtime's Pipeline: the frames of `Pipeline.generate` on a bundle of
    the same model and seed (face crop, decode noise), not those of the whole photo or a noiseless decode."""
    photo, prompt, seed, _ = held_out_generation(2)
    runtime = Pipeline.from_bundle(tiny_bundle, device="cpu", prompt_cache=None)
    want = runtime.generate(photo, prompt=prompt, seed=seed)
    pipe = torch_pipeline(tiny_models, Bucket(**tiny_models.preset.default_bucket), "tass")
    ours, built = pipe.manifest, runtime.manifest  # one manifest assembly (export/bundle_manifest.py)
    for section in ("preset", "model_config", "buckets", "sampler", "guidance", "reference"):
        assert getattr(ours, section) == getattr(built, section), section
    assert (ours.rope.layout, ours.rope.type, ours.rope.baked_in_dit) == (built.rope.layout, built.rope.type, True)
    got = pipe.generate(photo, prompt=prompt, seed=seed)
    assert pipe.manifest.model_config.vae.timestep_conditioning  # so decode noise is part of the path
    np.testing.assert_allclose(got.latent, want.latent, atol=1e-4)  # ONNX Runtime vs PyTorch float rounding
    assert np.abs(got.frames.astype(int) - want.frames).max() <= 1
    whole = pipe.generate(photo, prompt=prompt, seed=seed, face_crop=False).frames
    noiseless = frames_to_uint8(pipe.decode_video(got.latent, None))
    for wrong in (whole, noiseless):
        assert np.abs(wrong.astype(int) - want.frames).max() > 1


@pytest.mark.slow  # calibration and a Q/DQ export
def test_fp8_qdq_onnx_for_tensorrt(tiny_models, tmp_path: Path) -> None:
    """What `build-engines --backend tensorrt --precision fp8` hands TensorRT (the plan itself is never built here)."""
    import onnx
    import onnxruntime as ort

    from stdrc.engines.build import BuildConfig, fp8_qdq_onnx
    from stdrc.export.specs import component_specs

    bucket = Bucket(**tiny_models.preset.default_bucket)
    path = fp8_qdq_onnx(BuildConfig(), tiny_models, bucket, tmp_path)
    graph = onnx.load(str(path))
    ops = [n.op_type for n in graph.graph.node]
    assert ops.count("QuantizeLinear") > 0 and ops.count("QuantizeLinear") == ops.count("DequantizeLinear")
    spec = component_specs(tiny_models.preset, bucket)["dit"]
    assert [i.name for i in graph.graph.input] == [t.name for t in spec.inputs]
    out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, spec.sample_inputs(batch=2))
    assert out[0].shape == (2, bucket.tokens, 128)
