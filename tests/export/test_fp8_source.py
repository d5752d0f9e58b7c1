"""Lightricks-style pre-quantized FP8 files (benchmarks/synthetic.py `write_fp8_checkpoint`, tiny width):
laid out as ltx-core's fp8_scaled_mm policy reads them, recognised from the header, dequantised as read,
and refused in one line before any weight is read when a scale or layout is wrong."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from bench import bench_module  # tests/bench.py
from ltx_core.model.transformer.model_configurator import LTXModelConfigurator
from ltx_core.quantization.fp8_scaled_mm import (
    EXCLUDED_LAYER_SUBSTRINGS,
    FP8Linear,
    _apply_fp8_prepare_to_model,
    quantize_weight_to_fp8_per_tensor,
)
from refusals import assert_build_refused_before_any_read  # tests/refusals.py
from safetensors import safe_open
from safetensors.torch import save_file

from stdrc.export.checkpoint import open_checkpoint, read_checkpoint
from stdrc.export.config import get_preset
from stdrc.export.errors import CheckpointError
from stdrc.export.fp8_source import E4M3_MAX, FORMAT, IN_OUT, OUT_IN, QUANT_METADATA

P = "model.diffusion_model."
# float8_e4m3fn keeps 3 mantissa bits: round-to-nearest errs by at most 2^-4 of a normal value; below the
# smallest normal (2^-6) the step is the subnormal one, 2^-9, so the error is at most 2^-10 (of the scale).
E4M3_REL, E4M3_ABS = 2.0**-4, 2.0**-10


def _synthetic():
    return bench_module("synthetic")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """(bf16 file, its FP8 variant) per family, tiny width."""
    synthetic, folder = _synthetic(), tmp_path_factory.mktemp("fp8")
    out = {}
    for name in ("tiny", "tiny23"):
        bf16 = synthetic.write_checkpoint(folder / f"{name}.safetensors", get_preset(name), 2)
        out[name] = bf16, synthetic.write_fp8_checkpoint(bf16, folder / f"{name}-fp8.safetensors")
    return out


def _tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


@pytest.mark.parametrize("name", ["tiny", "tiny23"])
def test_policy_is_ltx_cores_fp8_scaled_mm_list(name: str) -> None:
    """At the real depth (48 blocks) and with the audio stream, the Linears a synthetic FP8 file quantizes
    are exactly those ltx-core's fp8_scaled_mm turns into FP8Linear."""
    synthetic = _synthetic()
    config = synthetic.real_config(get_preset(name).with_dit(num_layers=48))
    with torch.device("meta"):
        model = _apply_fp8_prepare_to_model(LTXModelConfigurator.from_config(config), EXCLUDED_LAYER_SUBSTRINGS)
    theirs = {n for n, m in model.named_modules() if isinstance(m, FP8Linear)}
    ours = set(synthetic.fp8_linears(config))
    assert ours == theirs
    assert "transformer_blocks.42.audio_attn1.to_q" in ours and "transformer_blocks.43.attn1.to_q" not in ours


@pytest.mark.parametrize("name", ["tiny", "tiny23"])
def test_synthetic_fp8_file_is_ltx_cores_format(files, name: str) -> None:
    """float8 [out, in] weights equal to ltx-core's own per-tensor quantisation of the bf16 weights (before
    its cuBLAS transpose), fp32 scalar scales, biases and excluded Linears untouched, `_quantization_metadata`
    beside `config`."""
    bf16, fp8 = files[name]
    (src, src_meta), (q, meta) = _tensors(bf16), _tensors(fp8)
    linears = _synthetic().fp8_linears(json.loads(meta["config"]))
    assert meta["config"] == src_meta["config"] and QUANT_METADATA in meta
    assert {k for k, v in q.items() if v.dtype == torch.float8_e4m3fn} == {f"{P}{n}.weight" for n in linears}
    assert set(q) == set(src) | {f"{P}{n}.{s}" for n in linears for s in ("weight_scale", "input_scale")}
    for n in linears:
        key = f"{P}{n}"
        theirs, their_scale = quantize_weight_to_fp8_per_tensor(src[f"{key}.weight"])
        assert torch.equal(q[f"{key}.weight"].view(torch.uint8), theirs.t().contiguous().view(torch.uint8)), n
        scale = q[f"{key}.weight_scale"]
        assert scale.dtype == torch.float32 and scale.shape == () and q[f"{key}.input_scale"].shape == ()
        torch.testing.assert_close(scale, their_scale, rtol=2e-7, atol=0)  # max|W| / 448 vs 1 / (448 / max|W|)
        assert q[f"{key}.bias"].dtype == torch.bfloat16 and torch.equal(q[f"{key}.bias"], src[f"{key}.bias"])
    assert all(torch.equal(q[k], v) for k, v in src.items() if k.removesuffix(".weight")[len(P):] not in linears)


@pytest.mark.parametrize("name", ["tiny", "tiny23"])
def test_fp8_file_is_recognised_and_dequantised_as_read(files, name: str) -> None:
    """The header tells the format, layout and every scale; the DiT reads as fp32 `weight * weight_scale`,
    within e4m3's rounding of the bf16 weights; the scale keys are consumed, not DiT keys."""
    bf16, fp8 = files[name]
    lazy = open_checkpoint(fp8, sha256="-")
    assert lazy.fp8 is not None and lazy.fp8.format == FORMAT and lazy.fp8.layout == OUT_IN
    assert open_checkpoint(bf16, sha256="-").fp8 is None
    raw, meta = _tensors(fp8)
    assert lazy.fp8.quantization_metadata == meta[QUANT_METADATA]
    scales = lazy.linear_scales("dit")
    assert scales and all(".audio" not in n for n in scales)  # the video-only DiT's own Linears
    for n, s in scales.items():
        assert s.weight_scale == raw[f"{P}{n}.weight_scale"].item() and s.input_scale > 0
    src, got = read_checkpoint(bf16), read_checkpoint(fp8)
    assert set(got.dit) == set(src.dit) and not any(k.endswith("_scale") for k in got.dit)
    for n, s in scales.items():
        w, ref = got.dit[f"{n}.weight"], src.dit[f"{n}.weight"].float()
        assert w.dtype == torch.float32
        assert torch.equal(w, raw[f"{P}{n}.weight"].float() * s.weight_scale)
        assert bool(((w - ref).abs() <= E4M3_REL * ref.abs() + E4M3_ABS * s.weight_scale).all()), n
        assert float((w - ref).norm() / ref.norm()) > 0  # really quantized
    assert all(torch.equal(got.dit[k], v) for k, v in src.dit.items() if k.removesuffix(".weight") not in scales)


def test_float8_tensor_is_never_cast_raw(files) -> None:
    lazy = open_checkpoint(files["tiny"][1], sha256="-")
    raw_cast = r"float8 tensor .*transformer_blocks\.1\..*\.weight has no weight_scale.*never cast raw"
    with pytest.raises(CheckpointError, match=raw_cast):
        dict(replace(lazy, fp8=None).tensors("dit"))


def test_in_out_layout_reads_as_out_in(files, tmp_path: Path) -> None:
    """A file storing every float8 weight [in, out] (as ltx-core holds them after loading) reads the same."""
    tensors, meta = _tensors(files["tiny"][1])
    for k, v in list(tensors.items()):
        if v.dtype == torch.float8_e4m3fn:
            tensors[k] = v.t().contiguous()
    save_file(tensors, str(tmp_path / "t.safetensors"), metadata=meta)
    lazy = open_checkpoint(tmp_path / "t.safetensors", sha256="-")
    assert lazy.fp8.layout == IN_OUT
    expected = read_checkpoint(files["tiny"][1]).dit
    got = dict(lazy.tensors("dit"))
    assert all(torch.equal(got[k], v) for k, v in expected.items())


Q = P + "transformer_blocks.1.attn1.to_q"
FFN = P + "transformer_blocks.1.ff.net.0.proj"
BAD = {
    "weight_scale missing": (lambda t, m: t.pop(f"{Q}.weight_scale"),
                             r"FP8 file missing 1 scale tensor\(s\) \(.*to_q\.weight_scale\).*never read without"),
    "input_scale missing": (lambda t, m: t.pop(f"{Q}.input_scale"), r"missing 1 scale tensor.*to_q\.input_scale"),
    "no scales at all": (lambda t, m: [t.pop(k) for k in list(t) if k.endswith("_scale")],
                         r"FP8 file missing \d+ scale tensor"),
    "scale NaN": (lambda t, m: t.__setitem__(f"{Q}.weight_scale", torch.tensor(float("nan"))),
                  r"to_q\.weight_scale = nan, not a finite positive scale"),
    "scale zero": (lambda t, m: t.__setitem__(f"{Q}.input_scale", torch.tensor(0.0)),
                   r"to_q\.input_scale = 0\.0, not a finite positive scale"),
    "scale negative": (lambda t, m: t.__setitem__(f"{Q}.weight_scale", torch.tensor(-1e-3)),
                       r"weight_scale = -0\.001"),
    "scale not a scalar": (lambda t, m: t.__setitem__(f"{Q}.weight_scale", torch.ones(3)), r"not a float scalar"),
    "layout neither": (lambda t, m: t.__setitem__(f"{FFN}.weight", torch.zeros(7, 9, dtype=torch.float8_e4m3fn)),
                       r"ff\.net\.0\.proj\.weight 7x9 matches neither \[out, in\] nor \[in, out\]"),
    "layouts mixed": (lambda t, m: t.__setitem__(f"{FFN}.weight", t[f"{FFN}.weight"].t().contiguous()),
                      r"mixes float8 weight layouts"),
    "e5m2": (lambda t, m: t.__setitem__(f"{Q}.weight", t[f"{Q}.weight"].to(torch.float8_e5m2)),
             r"float8 tensors other than float8_e4m3fn"),
    "float8 bias": (lambda t, m: t.__setitem__(f"{Q}.bias", t[f"{Q}.bias"].to(torch.float8_e4m3fn)),
                    r"not Linear weights \(.*to_q\.bias\)"),
    "metadata alone": (lambda t, m: [t.__setitem__(k, v.float()) for k, v in list(t.items())
                                     if v.dtype == torch.float8_e4m3fn] + [t.pop(k) for k in list(t)
                                                                           if k.endswith("_scale")],
                       r"has `_quantization_metadata` but no float8_e4m3fn weight"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_fp8_file_is_refused_before_any_read(files, tmp_path: Path, case: str, monkeypatch, capsys) -> None:
    """`build-engines` refuses in one line, exit 2, with no weight read and no bundle folder."""
    tensors, meta = _tensors(files["tiny"][1])
    change, message = BAD[case]
    change(tensors, meta)
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=meta)
    assert_build_refused_before_any_read(tmp_path / "bad.safetensors", tmp_path, message, monkeypatch, capsys)


def test_e4m3_max_is_torchs() -> None:
    assert E4M3_MAX == torch.finfo(torch.float8_e4m3fn).max


def test_lora_fuses_on_the_dequantised_weights(files, tmp_path: Path) -> None:
    """A LoRA on an FP8 file is added to each dequantised weight as it is read: ltx-core's `apply_loras` on the
    dequantised state dict (fp32) to 1e-6, and ltx-core's own scaled-FP8 fuse (dequantise, add, requantise
    per tensor) within that requantisation's e4m3 rounding."""
    from ltx_core.loader import LoraStateDictWithStrength, StateDict, apply_loras

    from stdrc.export.lora import LoraSpec
    from stdrc.export.models import load_models

    fp8 = files["tiny"][1]
    dequantised = read_checkpoint(fp8).dit
    lazy = open_checkpoint(fp8, sha256="-")
    quantized = [n for n in ("transformer_blocks.1.attn2.to_k", "transformer_blocks.1.ff.net.0.proj")
                 if n in lazy.linear_scales()]
    targets = [*quantized, "transformer_blocks.0.attn1.to_q", "patchify_proj"]  # two quantized, two bf16
    gen, lora = torch.Generator().manual_seed(5), {}
    for n in targets:
        rows, cols = dequantised[f"{n}.weight"].shape
        lora[f"diffusion_model.{n}.lora_A.weight"] = torch.randn(4, cols, generator=gen) * 0.1
        lora[f"diffusion_model.{n}.lora_B.weight"] = torch.randn(rows, 4, generator=gen) * 0.1
    save_file(lora, str(tmp_path / "lora.safetensors"))
    ours = load_models("tiny", checkpoint=fp8, components=("dit",),
                       loras=(LoraSpec(tmp_path / "lora.safetensors", 0.8),)).dit.ltx.state_dict()
    pairs = {k.removeprefix("diffusion_model."): v for k, v in lora.items()}
    lsd = [LoraStateDictWithStrength(StateDict(pairs, torch.device("cpu"), 0, {torch.float32}), 0.8)]
    # ltx-core fuses into bf16 (or float8) weights only: the dequantised ones rounded to bf16 (unit roundoff 2^-8)
    as_bf16 = {k: v.to(torch.bfloat16) for k, v in dequantised.items()}
    theirs = apply_loras(StateDict(as_bf16, torch.device("cpu"), 0, {torch.bfloat16}), lsd, dtype=torch.float32).sd
    raw, _ = _tensors(fp8)
    scales = lazy.linear_scales()
    for n in targets:
        key = f"{n}.weight"
        assert float((ours[key] - dequantised[key]).norm() / dequantised[key].norm()) > 1e-2, n  # fused
        # one bf16 rounding apart: theirs of the dequantised weight; ours of the fused bf16 ones (export/lora.py
        # returns a file's bf16 weight in bf16; a dequantised one stays fp32)
        bf16_rounding = 2.0**-8 * (dequantised[key].float().abs() + theirs[key].abs()) + 1e-7
        assert bool(((ours[key] - theirs[key]).abs() <= bf16_rounding).all()), n
    for n in quantized:  # ltx-core's FP8 fuse: its model holds the weight [in, out] beside its weight_scale
        fp8_sd = {f"{n}.weight": raw[f"{P}{n}.weight"].t(),
                  f"{n}.weight_scale": torch.tensor(scales[n].weight_scale)}
        fused = apply_loras(StateDict(fp8_sd, torch.device("cpu"), 0, {torch.float8_e4m3fn}), lsd,
                            dtype=torch.float32).sd
        requantised = fused[f"{n}.weight"].t().float() * fused[f"{n}.weight_scale"]
        w = ours[f"{n}.weight"]
        bound = E4M3_REL * w.abs() + E4M3_ABS * fused[f"{n}.weight_scale"] + 1e-6 * w.abs().max()
        assert bool(((requantised - w).abs() <= bound).all()), n


@pytest.mark.parametrize("layout", [OUT_IN, IN_OUT])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dequantised_into_a_lower_precision_is_the_fp32_product_cast(layout: str, dtype: torch.dtype) -> None:
    """Straight into the engine precision in blocks of rows (no whole fp32 copy): the same values as the
    fp32 `weight * weight_scale` cast once."""
    from stdrc.export.fp8_source import LinearScales, dequantize, quantize

    q, scale = quantize(torch.randn(2500, 48, generator=torch.Generator().manual_seed(1)))
    stored = q.t().contiguous() if layout == IN_OUT else q
    scales = LinearScales(scale, 1.0)
    fp32 = dequantize(stored, scales, layout)
    assert fp32.shape == (2500, 48) and torch.equal(fp32, q.float() * scale)
    low = dequantize(stored, scales, layout, dtype)
    assert low.dtype == dtype and torch.equal(low, fp32.to(dtype))


def test_fp16_build_reads_the_dequantised_weights_in_fp16(files) -> None:
    from stdrc.export.models import load_models

    fp8 = files["tiny"][1]
    dequantised = read_checkpoint(fp8).dit
    state = load_models("tiny", checkpoint=fp8, components=("dit",), dtype=torch.float16).dit.ltx.state_dict()
    for n in open_checkpoint(fp8, sha256="-").linear_scales():
        assert torch.equal(state[f"{n}.weight"], dequantised[f"{n}.weight"].to(torch.float16)), n
