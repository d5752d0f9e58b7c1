"""FP8 PTQ of the tiny DiT with nvidia-modelopt on CPU (fake quantization), and its Q/DQ ONNX.

Everything here runs on CPU: modelopt's FP8 quantizers as fake quant, the Q/DQ ONNX through
ONNX Runtime's CPU FP8 QuantizeLinear/DequantizeLinear. No TensorRT build is exercised here
(see tests/engines/test_tensorrt_plan.py).
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from stdrc.calibration import fp8
from stdrc.calibration.capture import random_dit_batches, schedule_sigmas
from stdrc.calibration.data import CALIBRATION_PROMPTS, reference_photos
from stdrc.export.config import get_preset
from stdrc.export.dit import DIT_INPUTS, BakedRopeDiT, build_dit
from stdrc.export.errors import ExportError
from stdrc.runtime.manifest import Bucket


@pytest.fixture(scope="module")
def mtq():
    """Only the tests that quantize need nvidia-modelopt; the others run without it."""
    return pytest.importorskip("modelopt.torch.quantization", reason="needs nvidia-modelopt: pip install 'stdrc[fp8]'")

SENSITIVE = ("patchify_proj", "caption_projection", "adaln_single", "proj_out")


@pytest.fixture(scope="module")
def preset():
    return get_preset("tiny")


@pytest.fixture(scope="module")
def bucket(preset):
    return Bucket(**preset.default_bucket)


@pytest.fixture(scope="module")
def dit(preset):
    return build_dit(preset.dit, seed=0)


@pytest.fixture(scope="module")
def calib(preset, bucket):
    return random_dit_batches(preset, bucket, n=8, seed=0)


@pytest.fixture(scope="module")
def held_out(preset, bucket):
    return random_dit_batches(preset, bucket, n=4, seed=1)


@pytest.fixture(scope="module")
def qdit(mtq, dit, calib):
    return fp8.quantize_dit_fp8(dit, calib)


def test_prompts_and_photos_are_offline():
    assert len(CALIBRATION_PROMPTS) >= 12
    assert len(set(CALIBRATION_PROMPTS)) == len(CALIBRATION_PROMPTS)
    photos = reference_photos()
    assert len(photos) == 2
    for photo in photos:
        assert photo.dtype == np.uint8 and photo.ndim == 3 and photo.shape[2] == 3
        assert min(photo.shape[:2]) >= 256 and photo.std() > 10


def test_batches_look_like_guidance_batches(preset, bucket, calib):
    video, ref = bucket.video_tokens, bucket.reference_tokens
    assert len(calib) == 8
    b = calib[0]
    assert b["latent"].shape == (3, bucket.tokens, preset.dit.in_channels)
    assert b["context"].shape == (3, bucket.text_length, preset.dit.caption_channels)
    # streams share the latent and timesteps; reference tokens are clean (timestep 0)
    assert torch.equal(b["latent"][0], b["latent"][2]) and torch.equal(b["timestep"][0], b["timestep"][1])
    assert (b["timestep"][:, video:] == 0).all() and (b["timestep"][:, :video] > 0).all()
    # stream 0 "no ref" masks the reference keys; streams 0 and 1 share the null text
    assert (b["attn_mask"][0, video:] == 0).all() and (b["attn_mask"][1:] == 1).all()
    assert torch.equal(b["context"][0], b["context"][1]) and not torch.equal(b["context"][1], b["context"][2])
    # sigmas spread over the schedule, first and last step included
    sigmas = schedule_sigmas(preset.steps)
    used = [float(x["timestep"][0, 0]) for x in calib]
    assert used[0] == pytest.approx(float(sigmas[0])) and used[-1] == pytest.approx(float(sigmas[-1]))
    assert used == sorted(used, reverse=True)
    two = random_dit_batches(preset, bucket, n=1, seed=0, streams=2)[0]
    assert two["attn_mask"].shape[0] == 2 and (two["attn_mask"] == 1).all()
    assert torch.equal(random_dit_batches(preset, bucket, 2, seed=3)[1]["latent"],
                       random_dit_batches(preset, bucket, 2, seed=3)[1]["latent"])
    assert ref == bucket.latent_height * bucket.latent_width


def test_sensitive_layers_stay_high_precision(qdit):
    from modelopt.torch.quantization.nn import TensorQuantizer

    for name, module in qdit.named_modules():
        if isinstance(module, TensorQuantizer) and any(s in name for s in SENSITIVE + ("norm_out",)):
            assert not module.is_enabled, f"{name} should stay unquantized"
    for name in ("ltx.patchify_proj", "ltx.proj_out", "ltx.adaln_single.linear",
                 "ltx.caption_projection.linear_1", "ltx.adaln_single.emb.timestep_embedder.linear_1"):
        layer = qdit.get_submodule(name)
        assert not layer.weight_quantizer.is_enabled and not layer.input_quantizer.is_enabled


def test_block_linears_are_quantized(preset, qdit):
    layers = fp8.quantized_layers(qdit)
    # per block: to_q, to_k, to_v, to_out for self- and cross-attention, two feed-forward linears
    assert len(layers) == 10 * preset.dit.num_layers
    assert all(name.startswith("ltx.transformer_blocks.") for name in layers)
    q = qdit.get_submodule("ltx.transformer_blocks.0.attn1.to_q").input_quantizer
    assert q.num_bits == (4, 3) and q.axis is None  # E4M3, per tensor


def test_fp8_error_small_but_nonzero(dit, qdit, held_out):
    error = fp8.fp8_dit_error(dit, qdit, held_out)
    assert 1e-4 < error < 0.03, error


def test_error_is_deterministic(dit, calib, held_out, qdit):
    again = fp8.quantize_dit_fp8(dit, calib)
    assert fp8.amax_scales(again) == fp8.amax_scales(qdit)
    assert fp8.fp8_dit_error(dit, again, held_out) == fp8.fp8_dit_error(dit, qdit, held_out)


def test_original_dit_untouched(dit):
    assert type(dit.ltx.patchify_proj) is torch.nn.Linear


def test_scales_positive_finite(qdit):
    scales = fp8.amax_scales(qdit)
    assert len(scales) == 2 * len(fp8.quantized_layers(qdit))
    assert all(math.isfinite(v) and v > 0 for v in scales.values())
    layer = "ltx.transformer_blocks.1.ff.net.2"
    weight = qdit.get_submodule(layer).weight
    amax = float(weight.detach().abs().max())
    assert scales[f"{layer}.weight_scale"] == pytest.approx(amax / 448.0, rel=1e-6)


def test_quantize_needs_batches(dit):
    with pytest.raises(ExportError, match="at least one batch"):
        fp8.quantize_dit_fp8(dit, [])


@pytest.mark.slow  # a Q/DQ export
def test_qdq_onnx_matches_fake_quant(tmp_path, qdit, held_out):
    batch = held_out[0]
    baked = BakedRopeDiT(qdit, batch["rope_cos"], batch["rope_sin"]).eval()
    feeds = {k: batch[k] for k in DIT_INPUTS}
    path = fp8.export_qdq_onnx(baked, tmp_path / "dit_fp8.onnx", feeds, batch_range=(1, 3))
    # the patch is undone after export
    assert "forward" not in vars(qdit.get_submodule("ltx.transformer_blocks.0.attn1.to_q.input_quantizer"))
    model = onnx.load(str(path))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") >= len(fp8.quantized_layers(qdit)) and "DequantizeLinear" in ops
    zero_points = [n.input[2] for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert zero_points and not any(n.domain == "trt" for n in model.graph.node)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for streams in (3, 1):
        sub = {k: v[:streams] for k, v in feeds.items()}
        (out,) = session.run(None, {k: v.numpy() for k, v in sub.items()})
        with torch.no_grad():
            ref = baked(*sub.values())
        assert out.shape == tuple(ref.shape)
        assert fp8.rel_l2(out, ref) < 1e-4


def test_qdq_export_refuses_unquantized(mtq, tmp_path, dit, held_out):
    batch = held_out[0]
    baked = BakedRopeDiT(dit, batch["rope_cos"], batch["rope_sin"])
    with pytest.raises(ExportError, match="no enabled FP8 quantizers"):
        fp8.export_qdq_onnx(baked, tmp_path / "x.onnx", {k: batch[k] for k in DIT_INPUTS})
    assert not list(tmp_path.iterdir())


@pytest.mark.slow  # a 48-layer calibration
def test_ltx23_follows_ltx_cores_fp8_scaled_mm_policy(mtq):
    """A 2.3 DiT (tiny width, 48 layers as the real one) calibrated: besides patchify_proj, the AdaLNs (prompt
    AdaLN included) and proj_out, block 0 and blocks 43..47 stay in high precision, as ltx-core's
    fp8_scaled_mm policy keeps them; the gates are quantized like the other block linears. The fast path
    takes the same list."""
    from ltx_core.quantization.fp8_scaled_mm import EXCLUDED_LAYER_SUBSTRINGS

    from stdrc.export.fast_path import fp8_layer_names

    preset = get_preset("tiny23").with_dit(num_layers=48)
    bucket = Bucket(frames=1, height=32, width=32, text_length=preset.default_bucket["text_length"])
    dit = build_dit(preset.dit, seed=0)
    qdit = fp8.quantize_dit_fp8(dit, random_dit_batches(preset, bucket, n=1, seed=0))
    linears = [n for n, m in dit.named_modules() if isinstance(m, torch.nn.Linear)]
    excluded = {n for n in linears if any(s in n.removeprefix("ltx.") for s in EXCLUDED_LAYER_SUBSTRINGS)}
    assert {"ltx.prompt_adaln_single.linear", "ltx.transformer_blocks.0.attn1.to_gate_logits",
            "ltx.transformer_blocks.47.ff.net.2"} <= excluded
    assert set(fp8.quantized_layers(qdit)) == set(linears) - excluded  # exactly ltx-core's FP8Linear set
    assert set(fp8_layer_names(dit)) == set(fp8.quantized_layers(qdit))
    assert "ltx.transformer_blocks.1.attn2.to_gate_logits" in fp8.quantized_layers(qdit)
    tiny = build_dit(get_preset("tiny").with_dit(num_layers=48).dit, seed=0)  # LTX-2 keeps its list
    assert "ltx.transformer_blocks.0.attn1.to_q" in fp8_layer_names(tiny)
