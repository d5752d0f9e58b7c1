"""FP8 figures for the manifest: calibration on DiT inputs captured through the PyTorch sampler."""

from __future__ import annotations

import json
import math
from pathlib import Path

from stdrc.calibration.report import fp8_quality
from stdrc.runtime.manifest import Bucket, sha256_file


def test_fp8_quality_is_measured_and_written(tiny_models, tmp_path: Path) -> None:
    bucket = Bucket(**tiny_models.preset.default_bucket)
    result = fp8_quality(tiny_models, bucket, "tass", tmp_path, calibration_prompts=2)
    steps = tiny_models.preset.steps
    assert result["calibration_batches"] == 2 * steps  # one captured DiT batch per sampling step
    assert 1e-4 < result["dit_rel_l2"] < 0.05  # FP8 is lossy, but not broken
    assert math.isfinite(result["frame_psnr_db"]) and result["frame_psnr_db"] > 25
    scales = json.loads((tmp_path / result["scales_file"]).read_text())
    assert scales and all(v > 0 and math.isfinite(v) for v in scales.values())
    assert any(k.endswith(".input_scale") for k in scales) and any(k.endswith(".weight_scale") for k in scales)
    assert not any(k.startswith(("ltx.patchify_proj", "ltx.proj_out")) for k in scales)  # kept in high precision
    assert sha256_file(tmp_path / result["scales_file"]) == result["scales_sha256"]


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
