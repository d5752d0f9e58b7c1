"""The PyTorch fast path (export/fast_path.py) on CPU: bf16, FP8 GEMMs through `torch._scaled_mm`.

`torch._scaled_mm` runs on CPU in this torch (E4M3 inputs, scalar fp32 scales), so the FP8
GEMMs are checked for real here: against modelopt's fake-quantized linear, against an explicit
quantize-dequantize reference built on the calibration's own Q/DQ op, and against fp32. The
scales come from a real `fp8_scales.json` written by the project's calibration
(`fp8_quality`, one calibration prompt). CUDA graphs and the GPU kernels are only exercised by
the `gpu` tests, which skip here.
"""

from __future__ import annotations

import copy
import fnmatch
import json

import pytest
import torch

from stdrc.calibration.capture import random_dit_batches
from stdrc.calibration.fp8 import fp8_config, rel_l2
from stdrc.export.dit import DIT_INPUTS, SENSITIVE_LAYER_PATTERNS, BakedRopeDiT, build_dit
from stdrc.export.errors import ExportError
from stdrc.export.fast_path import (
    CudaGraphStep,
    FastPathOptions,
    Fp8Linear,
    fp8_layer_names,
    load_fp8_scales,
    prepare_fast_dit,
    sdpa_choice,
)
from stdrc.runtime.manifest import Bucket

CUDA = torch.cuda.is_available()

# bf16 keeps 8 significant bits (rounding 2^-9 per op); through the tiny DiT's two blocks the
# velocity's rel L2 to fp32 is about 7e-3 (measured). Bound with margin; the floor shows bf16 ran.
BF16_REL_L2 = (1e-4, 2e-2)
# the same FP8 codes and scales as the reference: only summation order differs (measured ~1e-7)
FP8_EXACT_REL_L2 = 1e-5


@pytest.fixture(scope="module")
def bucket(tiny_models) -> Bucket:
    return Bucket(**tiny_models.preset.default_bucket)


@pytest.fixture(scope="module")
def mtq():
    """Only calibration and the modelopt comparisons need nvidia-modelopt; the bf16/SDPA tests run without it."""
    return pytest.importorskip("modelopt.torch.quantization", reason="needs nvidia-modelopt: pip install 'stdrc[fp8]'")


@pytest.fixture(scope="module")
def scales_path(mtq, tiny_models, bucket, tmp_path_factory):
    """fp8_scales.json as `build-engines --calibrate-fp8` writes it (one calibration prompt: faster)."""
    from stdrc.calibration.report import fp8_quality

    out = tmp_path_factory.mktemp("fp8")
    result = fp8_quality(tiny_models, bucket, "tass", out, calibration_prompts=1)
    return out / result.scales_file


@pytest.fixture(scope="module")
def scales(scales_path) -> dict[str, float]:
    return load_fp8_scales(scales_path)


@pytest.fixture(scope="module")
def batch(tiny_models, bucket) -> dict[str, torch.Tensor]:
    """Held out: seeded guidance batches (3 streams, "no ref" keys masked), not the calibration's inputs."""
    return random_dit_batches(tiny_models.preset, bucket, n=2, seed=7)[1]


@pytest.fixture(scope="module")
def reference(tiny_models, batch) -> torch.Tensor:
    with torch.no_grad():
        return BakedRopeDiT(tiny_models.dit, batch["rope_cos"], batch["rope_sin"])(*_args(batch))


def _args(batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    return [batch[k] for k in (*DIT_INPUTS, "sigma") if k in batch]  # sigma: a prompt-AdaLN DiT's


def _run(module, batch) -> torch.Tensor:
    with torch.no_grad():
        return module(*_args(batch))


def _fast(tiny_models, batch, scales=None, **options) -> torch.nn.Module:
    return prepare_fast_dit(tiny_models.dit, batch["rope_cos"], batch["rope_sin"], FastPathOptions(**options),
                            scales)


def test_bf16_close_to_fp32(tiny_models, batch, reference):
    fast = _fast(tiny_models, batch)
    out = _run(fast, batch)
    assert out.dtype == torch.float32 and out.shape == reference.shape
    lo, hi = BF16_REL_L2
    assert lo < rel_l2(out, reference) < hi
    dtypes = {p.dtype for p in fast.parameters()} | {fast.rope_cos.dtype, fast.rope_sin.dtype}
    assert dtypes == {torch.bfloat16}


def test_original_untouched(tiny_models, batch, scales, reference):
    _fast(tiny_models, batch, scales, fp8=True)
    assert {p.dtype for p in tiny_models.dit.parameters()} == {torch.float32}
    assert not any(isinstance(m, Fp8Linear) for m in tiny_models.dit.modules())
    again = _run(BakedRopeDiT(tiny_models.dit, batch["rope_cos"], batch["rope_sin"]), batch)
    assert torch.equal(again, reference)


def test_fp8_close_to_fp32_and_not_bf16(tiny_models, batch, scales, reference):
    fp8 = _run(_fast(tiny_models, batch, scales, fp8=True), batch)
    bf16 = _run(_fast(tiny_models, batch), batch)
    assert 1e-4 < rel_l2(fp8, reference) < 3e-2
    assert rel_l2(fp8, bf16) > 1e-4  # the FP8 GEMMs ran


def _qdq_reference(dit, scales) -> torch.nn.Module:
    """fp32 DiT with each FP8 layer as Q/DQ(x) @ Q/DQ(W)^T + b, with the calibration's own Q/DQ op."""
    ref = copy.deepcopy(dit)
    qdq = torch.ops.stdrc.fp8_qdq

    class QdqLinear(torch.nn.Module):
        def __init__(self, linear, name):
            super().__init__()
            self.linear = linear
            self.s_in, self.s_w = scales[f"{name}.input_scale"], scales[f"{name}.weight_scale"]

        def forward(self, x):
            w = qdq(self.linear.weight, self.s_w)
            return torch.nn.functional.linear(qdq(x, self.s_in), w, self.linear.bias)

    for name in fp8_layer_names(ref):
        parent, _, child = name.rpartition(".")
        setattr(ref.get_submodule(parent), child, QdqLinear(ref.get_submodule(name), name))
    return ref


def test_fp8_gemms_match_qdq_reference(tiny_models, batch, scales):
    """fp32 activations: the FP8 path is the Q/DQ model up to summation order."""
    qdq_dit = _qdq_reference(tiny_models.dit, scales)
    ref = _run(BakedRopeDiT(qdq_dit, batch["rope_cos"], batch["rope_sin"]), batch)
    out = _run(_fast(tiny_models, batch, scales, fp8=True, dtype=torch.float32), batch)
    assert rel_l2(out, ref) < FP8_EXACT_REL_L2


@pytest.fixture(scope="module")
def modelopt_linear(mtq):
    """A 64 -> 48 linear quantized by modelopt with the calibration's FP8 config, and its inputs."""
    from stdrc.calibration.fp8 import amax_scales

    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 48))
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(48, 64, generator=gen) * 0.1)
    x = torch.randn(5, 7, 64, generator=gen) * 3

    def calibrate(m):
        with torch.no_grad():
            m(x)

    qmodel = mtq.quantize(copy.deepcopy(model), fp8_config(), forward_loop=calibrate)
    s = amax_scales(qmodel)
    return model[0], qmodel, x, s["0.input_scale"], s["0.weight_scale"]


@pytest.mark.parametrize("gain", [1.0, 2.0], ids=["calibrated-range", "saturating"])
def test_fp8_linear_matches_modelopt(modelopt_linear, gain):
    linear, qmodel, x, s_in, s_w = modelopt_linear
    x = x * gain  # gain 2: half the inputs exceed the calibrated amax and saturate at +-448
    with torch.no_grad():
        theirs = qmodel(x)
        ours = Fp8Linear.from_linear(linear, s_in, s_w, torch.float32)(x)
        ours_bf16 = Fp8Linear.from_linear(linear, s_in, s_w, torch.bfloat16)(x.bfloat16())
        theirs_bf16_input = qmodel(x.bfloat16().float())
        exact = linear(x)
    assert ours.shape == theirs.shape == (5, 7, 48)
    assert rel_l2(ours, theirs) < 1e-6  # measured 1.5e-7
    # bf16 output: the same FP8 GEMM, rounded once to bf16 (2^-9 relative per element)
    assert ours_bf16.dtype == torch.bfloat16 and rel_l2(ours_bf16.float(), theirs_bf16_input) < 4e-3
    assert rel_l2(ours, exact) > 1e-3  # FP8 is lossy: the comparison above is not vacuous


def test_sensitive_layers_left_alone(tiny_models, batch, scales):
    fast = _fast(tiny_models, batch, scales, fp8=True)
    fp8 = {name for name, m in fast.named_modules() if isinstance(m, Fp8Linear)}
    linear = {name for name, m in fast.named_modules() if isinstance(m, torch.nn.Linear)}
    assert len(fp8) == 10 * tiny_models.preset.dit.num_layers == len(scales) // 2
    assert all(".transformer_blocks." in name for name in fp8)
    assert {n.removeprefix("dit.") for n in fp8} == {k.rpartition(".")[0] for k in scales}
    sensitive = {n for n in linear if any(fnmatch.fnmatchcase(n, p) for p in SENSITIVE_LAYER_PATTERNS)}
    assert sensitive == linear
    assert {"dit.ltx.patchify_proj", "dit.ltx.proj_out", "dit.ltx.adaln_single.linear"} <= linear
    assert all(fast.get_submodule(n).weight.dtype == torch.bfloat16 for n in linear)
    assert all(fast.get_submodule(n).weight.dtype == torch.float8_e4m3fn for n in fp8)


@pytest.mark.parametrize("variant", [{"rope_type": "split"},
                                     {"apply_gated_attention": True, "cross_attention_adaln": True}],
                         ids=["split-rope", "gated-adaln"])
def test_dit_variants(mtq, tiny_models, bucket, variant):
    """Split RoPE tables and gated attention go through the fast path too; a 2-head gate stays bf16."""
    from stdrc.calibration.fp8 import amax_scales, quantize_dit_fp8

    preset = tiny_models.preset.with_dit(**variant)
    dit = build_dit(preset.dit, seed=3)
    scales = amax_scales(quantize_dit_fp8(dit, random_dit_batches(preset, bucket, n=2, seed=0)))
    held = random_dit_batches(preset, bucket, n=2, seed=1)
    batch, cos, sin = held[1], held[1]["rope_cos"], held[1]["rope_sin"]
    reference = _run(BakedRopeDiT(dit, cos, sin), batch)
    for options, bound in ((FastPathOptions(), BF16_REL_L2[1]), (FastPathOptions(fp8=True), 3e-2)):
        fast = prepare_fast_dit(dit, cos, sin, options, scales)
        assert BF16_REL_L2[0] < rel_l2(_run(fast, batch), reference) < bound
    fp8 = [n for n, m in fast.named_modules() if isinstance(m, Fp8Linear)]
    # the 2.3 AdaLN brings ltx-core's fp8_scaled_mm policy: block 0 stays in high precision
    assert len(fp8) == 10 * (preset.dit.num_layers - preset.dit.cross_attention_adaln)
    gates = [m for n, m in fast.named_modules() if n.endswith("to_gate_logits")]
    assert all(type(m) is torch.nn.Linear and m.weight.dtype == torch.bfloat16 for m in gates)
    assert len(gates) == (2 * preset.dit.num_layers if preset.dit.apply_gated_attention else 0)


def _one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_missing_scale_is_a_clear_error(tiny_models, batch, scales):
    layer = "ltx.transformer_blocks.1.ff.net.2"
    partial = {k: v for k, v in scales.items() if k != f"{layer}.input_scale"}
    with pytest.raises(ExportError) as e:
        _fast(tiny_models, batch, partial, fp8=True)
    message = _one_line_error(e)
    assert layer in message and "input_scale" in message and "--calibrate-fp8" in message
    with pytest.raises(ExportError, match="needs calibrated scales"):
        _fast(tiny_models, batch, None, fp8=True)


def test_scales_of_other_weights_or_layers_refused(tiny_models, batch, scales):
    other = build_dit(tiny_models.preset.dit, seed=1)
    with pytest.raises(ExportError, match="calibrated on other weights") as e:
        prepare_fast_dit(other, batch["rope_cos"], batch["rope_sin"], FastPathOptions(fp8=True), scales)
    assert "--calibrate-fp8" in _one_line_error(e)
    extra = {**scales, "ltx.proj_out.input_scale": 0.1, "ltx.proj_out.weight_scale": 0.1}
    with pytest.raises(ExportError, match="ltx.proj_out.*does not quantize"):
        _fast(tiny_models, batch, extra, fp8=True)


def test_bad_scale_files(tmp_path, scales_path):
    with pytest.raises(ExportError, match="--calibrate-fp8"):
        load_fp8_scales(tmp_path / "missing.json")
    (tmp_path / "neg.json").write_text(json.dumps({"a.input_scale": -1.0}))
    with pytest.raises(ExportError, match="positive finite"):
        load_fp8_scales(tmp_path / "neg.json")
    (tmp_path / "text.json").write_text("not json")
    with pytest.raises(ExportError, match="not JSON"):
        load_fp8_scales(tmp_path / "text.json")
    assert load_fp8_scales(scales_path) == json.loads(scales_path.read_text())


def test_fp8_linear_needs_gemm_friendly_shapes():
    with pytest.raises(ExportError, match="multiples of 16.*SENSITIVE_LAYER_PATTERNS"):
        Fp8Linear.from_linear(torch.nn.Linear(24, 40), 0.01, 0.01, torch.bfloat16, "odd")


def test_bad_dtype_refused(tiny_models, batch):
    with pytest.raises(ExportError, match="bfloat16"):
        _fast(tiny_models, batch, dtype=torch.float16)


class SdpaCalls(torch.overrides.TorchFunctionMode):
    """Records the (query dtype, mask) of every real `scaled_dot_product_attention` call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            self.calls.append((args[0].dtype, kwargs.get("attn_mask")))
        return func(*args, **kwargs)


def test_attention_masks_are_broadcast_biases(tiny_models, batch):
    """Every SDPA call gets bf16 q and a (B, 1, 1, keys) bias: never a dense (B, 1, N, N) mask."""
    fast = _fast(tiny_models, batch)
    with SdpaCalls() as sdpa:
        _run(fast, batch)
    b, n = batch["attn_mask"].shape
    length = batch["context_mask"].shape[1]
    assert len(sdpa.calls) == 2 * tiny_models.preset.dit.num_layers  # self- and cross-attention per block
    for i, (dtype, mask) in enumerate(sdpa.calls):
        assert dtype == torch.bfloat16 and mask.dtype == torch.bfloat16
        assert mask.shape == (b, 1, 1, n if i % 2 == 0 else length)
    self_mask = sdpa.calls[0][1]
    assert self_mask[0, 0, 0, -1] < -1e30 and (self_mask[2] == 0).all()  # stream 0: "no ref" keys hidden
    assert sdpa_choice(b, 2, n, n, 32, torch.bfloat16, "cpu", key_bias=True) != "MATH"


@pytest.mark.skipif(CUDA, reason="checks the error raised where CUDA is missing")
def test_cuda_graph_without_cuda_is_a_clear_error(tiny_models, batch):
    with pytest.raises(ExportError, match="cuda_graph=False"):
        _fast(tiny_models, batch, cuda_graph=True)


# -- GPU only: not run in the session that wrote them (no GPU) --------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (CUDA graphs, GPU FP8 GEMMs)")
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_cuda_graph_replays_eager(tiny_models, batch, scales, fp8):
    if fp8 and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 GEMMs need compute capability 8.9+")
    args = [t.cuda() for t in _args(batch)]
    bucket = Bucket(**tiny_models.preset.default_bucket)
    other = [t.cuda() for t in _args(random_dit_batches(tiny_models.preset, bucket, n=1, seed=11)[0])]
    cos, sin = batch["rope_cos"], batch["rope_sin"]
    eager = prepare_fast_dit(tiny_models.dit, cos, sin, FastPathOptions(fp8=fp8), scales, device="cuda")
    graph = prepare_fast_dit(tiny_models.dit, cos, sin, FastPathOptions(fp8=fp8, cuda_graph=True), scales,
                             device="cuda")
    assert isinstance(graph, CudaGraphStep)
    with torch.no_grad():
        for feeds in (args, other, args):
            want = eager(*feeds)
            got = graph(*feeds).clone()
            assert rel_l2(got, want) < 1e-6
        assert len(graph.graphs) == 1
        cpu = _run(_fast(tiny_models, batch, scales, fp8=fp8), batch)
        assert rel_l2(eager(*args).cpu(), cpu) < 2e-2  # CUDA and CPU kernels round differently


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_sdpa_kernels_on_gpu():
    """Flash takes no mask: with the key bias a fused kernel (efficient or cuDNN) still runs, not math."""
    with_bias = sdpa_choice(3, 32, 6528, 6528, 128, torch.bfloat16, "cuda", key_bias=True)
    without = sdpa_choice(3, 32, 6528, 6528, 128, torch.bfloat16, "cuda", key_bias=False)
    assert with_bias in ("EFFICIENT_ATTENTION", "CUDNN_ATTENTION"), with_bias
    assert without in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"), without
