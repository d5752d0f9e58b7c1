"""FP8 figures for the manifest: calibration on DiT inputs captured through the PyTorch sampler."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from stdrc.calibration.fp8 import fp8_dit_error
from stdrc.calibration.report import TorchDenoiser, _generate, calibrate_dit_fp8, fp8_quality, held_out_generation
from stdrc.export.errors import ExportError
from stdrc.runtime.manifest import Bucket, sha256_file


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
    cond, seed, _ = held_out_generation(tiny_models, bucket, 2)
    _, tables = tiny_models.rope(bucket, "tass")
    recorder = TorchDenoiser(tiny_models.dit, tables.cos, tables.sin, record=True)
    _generate(tiny_models, bucket, recorder, cond, seed, steps)
    held = recorder.recorded
    assert len(held) == steps and f"{steps} DiT batches" in result.held_out
    assert not any(torch.equal(h["latent"], c["latent"]) or torch.equal(h["context"][2], c["context"][2])
                   for h in held for c in captured)
    assert result.dit_rel_l2_held_out == pytest.approx(fp8_dit_error(tiny_models.dit, qdit, held), rel=1e-6)
    with pytest.raises(ExportError, match="kept back"):
        held_out_generation(tiny_models, bucket, 99)
    scales = json.loads((tmp_path / result.scales_file).read_text())
    assert scales and all(v > 0 and math.isfinite(v) for v in scales.values())
    assert any(k.endswith(".input_scale") for k in scales) and any(k.endswith(".weight_scale") for k in scales)
    assert not any(k.startswith(("ltx.patchify_proj", "ltx.proj_out")) for k in scales)  # kept in high precision
    assert sha256_file(tmp_path / result.scales_file) == result.scales_sha256


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
