"""Pre-quantized FP8 Linears (export/fp8_scaled.py): ltx-core's fp8_scaled_mm arithmetic on CPU, its Q/DQ ONNX
with the file's scales, and ltx-core's per-tensor requantisation.

The FP8 weights here are made as a Lightricks file holds them: ltx-core's own exclusion list
(`EXCLUDED_LAYER_SUBSTRINGS`), per-tensor max weight scales (`quantize_weight_to_fp8_per_tensor`), and input
scales from the activations' maxima. ltx-core's `FP8Linear` needs TensorRT-LLM's two CUDA ops; they are
defined here on CPU from TensorRT-LLM's kernel (cudaFp8Utils.cu: x / scale, saturating E4M3 cast; cuBLAS: fp32
accumulation times scale_a * scale_b, out dtype) so that ltx-core's own module, layout transposition and state
dict loading run.
"""

from __future__ import annotations

import copy

import ltx_core.loader  # noqa: F401 (first: importing ltx_core.quantization alone is a circular import)
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from ltx_core.quantization.fp8_scaled_mm import (
    EXCLUDED_LAYER_SUBSTRINGS,
    FP8_PREPARE_MODULE_OPS,
    FP8_TRANSPOSE_SD_OPS,
    quantize_weight_to_fp8_per_tensor,
)

from stdrc.calibration.capture import random_dit_batches
from stdrc.calibration.fp8 import export_qdq_onnx, rel_l2
from stdrc.export.dit import DIT_INPUTS, BakedRopeDiT, STDRCTransformer
from stdrc.export.errors import ExportError
from stdrc.export.fp8_scaled import (
    ScaledFp8Linear,
    qdq_form,
    quantize_e4m3,
    requantize_per_tensor,
    scaled_fp8_dit,
)
from stdrc.runtime.manifest import Bucket

# the same E4M3 codes and scales: only where the fp32 products are rounded and summed differs
SAME_CODES_REL_L2 = 1e-5


def _define_trtllm_ops_on_cpu() -> None:
    if hasattr(torch.ops.tensorrt_llm, "static_quantize_e4m3_per_tensor"):
        return

    @torch.library.custom_op("tensorrt_llm::static_quantize_e4m3_per_tensor", mutates_args=())
    def static_quantize(x: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = torch.clamp(x.float() / scale.float(), -448.0, 448.0).to(torch.float8_e4m3fn)
        return q, scale.clone()

    @torch.library.custom_op("trtllm::cublas_scaled_mm", mutates_args=())
    def scaled_mm(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
                  bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
        return ((a.float() @ b.float()) * (scale_a * scale_b)).to(out_dtype)


@pytest.fixture(scope="module")
def bucket(tiny_models) -> Bucket:
    return Bucket(**tiny_models.preset.default_bucket)


@pytest.fixture(scope="module")
def batch(tiny_models, bucket) -> dict[str, torch.Tensor]:
    return random_dit_batches(tiny_models.preset, bucket, n=2, seed=5)[1]


def _args(batch):
    return [batch[k] for k in (*DIT_INPUTS, "rope_cos", "rope_sin")]


@pytest.fixture(scope="module")
def fp8_file(tiny_models, batch):
    """(file state dict in ltx-core's keys, scales in our module names, dequantised fp32 DiT) made as a
    Lightricks file is: ltx-core's exclusion list, weight scales max|W|/448, input scales from activation maxima."""
    dit = copy.deepcopy(tiny_models.dit)
    quantized = [n for n, m in dit.ltx.named_modules() if isinstance(m, torch.nn.Linear)
                 and not any(s in n for s in EXCLUDED_LAYER_SUBSTRINGS)]
    amax: dict[str, float] = {}
    hooks = [dit.ltx.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: amax.__setitem__(n, max(amax.get(n, 0.0), float(a[0].abs().max()))))
        for n in quantized]
    with torch.no_grad():
        dit(*_args(random_dit_batches(tiny_models.preset, Bucket(**tiny_models.preset.default_bucket), 1, 9)[0]))
    for h in hooks:
        h.remove()
    state = {k: v.to(torch.bfloat16) for k, v in dit.ltx.state_dict().items()}
    scales = {}
    with torch.no_grad():
        for n in quantized:
            codes_t, weight_scale = quantize_weight_to_fp8_per_tensor(dit.ltx.get_submodule(n).weight)
            state[f"{n}.weight"] = codes_t.t().contiguous()  # the file's [out, in]
            state[f"{n}.weight_scale"] = weight_scale
            state[f"{n}.input_scale"] = torch.tensor(amax[n] / 448.0 * 0.8)  # the largest inputs saturate
            scales[f"ltx.{n}.weight_scale"] = float(weight_scale)
            scales[f"ltx.{n}.input_scale"] = float(state[f"{n}.input_scale"])
        for k, v in dit.ltx.state_dict().items():  # what a reader dequantising the file gives
            if k.endswith(".weight") and f"{k[:-7]}.weight_scale" in state:
                v.copy_(state[k].float() * state[f"{k[:-7]}.weight_scale"])
            else:
                v.copy_(state[k].float())
    assert len(quantized) == 10 * (tiny_models.preset.dit.num_layers - 1)  # block 0 is excluded
    return state, scales, dit


def test_requantize_is_ltx_cores(tiny_models):
    weight = tiny_models.dit.ltx.get_submodule("transformer_blocks.1.ff.net.0.proj").weight.detach() * 3.7
    codes, scale = requantize_per_tensor(weight)
    theirs, their_scale = quantize_weight_to_fp8_per_tensor(weight)
    assert codes.dtype == torch.float8_e4m3fn and codes.shape == weight.shape
    assert torch.equal(codes.view(torch.uint8), theirs.t().contiguous().view(torch.uint8))  # bit for bit
    assert scale == float(their_scale)
    assert float(codes.float().abs().max()) == 448.0


def test_linear_recovers_the_files_codes(fp8_file):
    state, scales, dit = fp8_file
    name = "transformer_blocks.1.attn1.to_q"
    layer = ScaledFp8Linear.from_linear(dit.ltx.get_submodule(name), scales[f"ltx.{name}.input_scale"],
                                        scales[f"ltx.{name}.weight_scale"], name)
    assert torch.equal(layer.weight.view(torch.uint8), state[f"{name}.weight"].view(torch.uint8))
    assert layer.bias.dtype == torch.float32


def test_emulation_is_ltx_cores_fp8_dit(fp8_file, batch):
    """ltx-core's FP8 model (its FP8Linear swap, its [out, in] -> [in, out] load transposition, its forward)
    against `scaled_fp8_dit` on the dequantised weights: the same codes and scales, in bf16 and fp32."""
    _define_trtllm_ops_on_cpu()
    state, scales, dit = fp8_file
    ltx = FP8_PREPARE_MODULE_OPS.mutator(copy.deepcopy(dit.ltx))
    loaded = {}
    for key, value in state.items():
        for kv in FP8_TRANSPOSE_SD_OPS.apply_to_key_value(key, value):
            loaded[kv.new_key] = kv.new_value
    ltx.load_state_dict(loaded, strict=True, assign=True)
    theirs = STDRCTransformer(ltx).eval()
    ours = scaled_fp8_dit(dit, scales)
    fp8_layers = [n for n, m in ours.named_modules() if isinstance(m, ScaledFp8Linear)]
    assert len(fp8_layers) == len(scales) // 2
    assert sorted(f"ltx.{n}" for n, m in ltx.named_modules() if type(m).__name__ == "FP8Linear") == sorted(fp8_layers)
    with torch.no_grad():
        exact = dit(*_args(batch))
        for dtype, bound in ((torch.float32, SAME_CODES_REL_L2), (torch.bfloat16, 2e-2)):
            args = [a.to(dtype) if a.is_floating_point() and a is not batch["timestep"] else a for a in _args(batch)]
            got = ours.to(dtype)(*args).float()
            want = theirs.to(dtype)(*args).float()
            assert rel_l2(got, want) < bound, dtype
        ours.float()
        quantized = ours(*_args(batch))
    assert 1e-4 < rel_l2(quantized, exact) < 0.05  # FP8 activations really ran, within FP8's error
    assert type(dit.ltx.get_submodule("transformer_blocks.1.attn1.to_q")) is torch.nn.Linear  # dit untouched


@pytest.mark.slow  # a Q/DQ ONNX export of the tiny DiT: ~10 s
def test_qdq_onnx_with_the_files_scales(tmp_path, fp8_file, batch):
    _, scales, dit = fp8_file
    fp8_dit = scaled_fp8_dit(dit, scales)
    baked = BakedRopeDiT(fp8_dit, batch["rope_cos"], batch["rope_sin"]).eval()
    feeds = {k: batch[k] for k in DIT_INPUTS}
    path = export_qdq_onnx(baked, tmp_path / "dit_fp8.onnx", feeds, batch_range=(1, 3))
    model = onnx.load(str(path))
    layers = len(scales) // 2
    fp8_weights = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT8E4M3FN
                   and len(i.dims) == 2]
    assert len(fp8_weights) == layers  # the file's codes, one byte per weight
    ops = [n.op_type for n in model.graph.node]
    # one Q/DQ per distinct (input, input_scale): to_q/to_k/to_v share theirs (the exporter merges them)
    assert 0 < ops.count("QuantizeLinear") <= layers
    assert ops.count("DequantizeLinear") == layers + ops.count("QuantizeLinear")
    assert not any(m.qdq for m in fp8_dit.modules() if isinstance(m, ScaledFp8Linear))  # restored
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for streams in (3, 1):
        sub = {k: v[:streams] for k, v in feeds.items()}
        (out,) = session.run(None, {k: v.numpy() for k, v in sub.items()})
        with torch.no_grad():
            ref = baked(*sub.values())  # the fp8_scaled_mm emulation
        assert out.shape == tuple(ref.shape)
        assert rel_l2(out, ref) < 1e-4


def test_qdq_form_is_the_same_arithmetic(fp8_file, batch):
    _, scales, dit = fp8_file
    fp8_dit = scaled_fp8_dit(dit, scales)
    with torch.no_grad():
        emulated = fp8_dit(*_args(batch))
        with qdq_form(fp8_dit) as count:
            qdq = fp8_dit(*_args(batch))
    assert count == len(scales) // 2
    assert rel_l2(qdq, emulated) < SAME_CODES_REL_L2


def test_refusals(fp8_file):
    _, scales, dit = fp8_file
    name = "ltx.transformer_blocks.1.attn1.to_q"
    with pytest.raises(ExportError, match="not E4M3 codes"):  # e.g. a LoRA fused after dequantisation
        scaled_fp8_dit(dit, {**scales, f"{name}.weight_scale": scales[f"{name}.weight_scale"] * 1.1})
    with pytest.raises(ExportError, match="no input_scale for " + name):
        scaled_fp8_dit(dit, {k: v for k, v in scales.items() if k != f"{name}.input_scale"})
    with pytest.raises(ExportError, match="not a Linear"):
        scaled_fp8_dit(dit, {**scales, "ltx.norm_out.weight_scale": 1.0, "ltx.norm_out.input_scale": 1.0})
    with pytest.raises(ExportError, match="positive and finite"):
        scaled_fp8_dit(dit, {**scales, f"{name}.input_scale": float("nan")})
    with pytest.raises(ExportError, match="float8_e4m3fn"):
        ScaledFp8Linear(torch.zeros(4, 4), 1.0, 1.0, None)
    assert np.isfinite(list(scales.values())).all()


def test_fast_path_takes_the_files_scales(fp8_file, batch):
    """`prepare_fast_dit` with a file's scales: its layers (block 0 excluded, as the file's list says), its
    codes through `torch._scaled_mm` (runs on CPU), matching the fp8_scaled_mm emulation."""
    from stdrc.export.fast_path import FastPathOptions, Fp8Linear, prepare_fast_dit

    _, scales, dit = fp8_file
    args = [batch[k] for k in DIT_INPUTS]
    with torch.no_grad():
        emulated = BakedRopeDiT(scaled_fp8_dit(dit, scales), batch["rope_cos"], batch["rope_sin"])(*args)
        for dtype, bound in ((torch.float32, SAME_CODES_REL_L2), (torch.bfloat16, 2e-2)):
            fast = prepare_fast_dit(dit, batch["rope_cos"], batch["rope_sin"], FastPathOptions(dtype=dtype, fp8=True),
                                    scales, scales_from_file=True)
            layers = sorted(n.removeprefix("dit.") for n, m in fast.named_modules() if isinstance(m, Fp8Linear))
            assert layers == sorted({k.rpartition(".")[0] for k in scales})
            assert rel_l2(fast(*args), emulated) < bound, dtype
    with pytest.raises(ExportError, match="not E4M3 codes"):
        prepare_fast_dit(dit, batch["rope_cos"], batch["rope_sin"], FastPathOptions(fp8=True),
                         {k: v * 1.5 if k.endswith("weight_scale") else v for k, v in scales.items()},
                         scales_from_file=True)


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_lora_on_fp8_weights_is_ltx_cores(tmp_path, tiny_models, fp8_file, strength):
    """`Fp8LoraTransform` on the dequantised weights as read == ltx-core's `apply_loras` on the file's scaled
    FP8 state (dequantise, add (B * strength) @ A as bf16, requantise per tensor): the same E4M3 codes bit for
    bit and the same weight_scale; an unquantized weight fuses as ever, an untouched FP8 weight keeps its
    codes and scale."""
    from ltx_core.loader.fuse_loras import apply_loras
    from ltx_core.loader.primitives import LoraStateDictWithStrength, StateDict
    from safetensors.torch import save_file

    from stdrc.export.lora import Fp8LoraTransform, LoraSpec, lora_transform

    state, scales, dit = fp8_file
    q, plain, untouched = ("transformer_blocks.1.attn1.to_q", "transformer_blocks.0.attn1.to_q",
                           "transformer_blocks.1.ff.net.2")
    gen = torch.Generator().manual_seed(3)
    lora = {}
    for name in (q, plain):
        rows, cols = state[f"{name}.weight"].shape
        lora[f"{name}.lora_A.weight"] = torch.randn(4, cols, generator=gen) * 0.3
        lora[f"{name}.lora_B.weight"] = torch.randn(rows, 4, generator=gen) * 0.3
    path = tmp_path / "lora.safetensors"
    save_file({f"diffusion_model.{k}": v for k, v in lora.items()}, str(path))

    loaded = {k: v.t().contiguous() if k.endswith(".weight") and v.dtype == torch.float8_e4m3fn else v
              for k, v in state.items()}  # as ltx-core holds a scaled-FP8 model: [in, out]
    theirs = apply_loras(StateDict(loaded, torch.device("cpu"), 0, set()),
                         [LoraStateDictWithStrength(StateDict(lora, torch.device("cpu"), 0, set()), strength)]).sd
    plain_lora, lora_set = lora_transform([LoraSpec(path, strength)], tiny_models.preset.dit)
    quantized = frozenset(k[: -len("_scale")] for k in state if k.endswith(".weight_scale"))
    transform = Fp8LoraTransform(lora_set, quantized)
    for name in (q, untouched):
        dequantised = state[f"{name}.weight"].float() * state[f"{name}.weight_scale"]
        ours = transform(f"{name}.weight", dequantised)
        codes = quantize_e4m3(ours, transform.weight_scales.get(name, float(state[f"{name}.weight_scale"])))
        assert torch.equal(codes.view(torch.uint8), theirs[f"{name}.weight"].t().contiguous().view(torch.uint8))
        assert torch.equal(codes.float() * float(theirs[f"{name}.weight_scale"]), ours)
    assert transform.weight_scales == {q: float(theirs[f"{q}.weight_scale"])}  # only the LoRA's weight
    assert transform.weight_scales[q] != float(state[f"{q}.weight_scale"])
    bf16_weight = state[f"{plain}.weight"].float()
    assert torch.equal(transform(f"{plain}.weight", bf16_weight), plain_lora(f"{plain}.weight", bf16_weight))
    assert transform.sha256 != plain_lora.sha256  # another stage-cache key than the float fusion
