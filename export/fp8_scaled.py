"""Pre-quantized FP8 Linears (ltx-core's `fp8_scaled_mm` files): their arithmetic on CPU, their Q/DQ form, and
ltx-core's LoRA requantisation.

A Lightricks FP8 checkpoint holds, per quantized Linear, an E4M3 weight [out, in], a `weight_scale` (the
dequantisation multiplier) and an `input_scale` (a static activation scale). ltx-core 1.0.0's `FP8Linear`
(quantization/fp8_scaled_mm.py:40-73) runs it as TensorRT-LLM's `static_quantize_e4m3_per_tensor` (x divided by
`input_scale` in fp32, saturated to E4M3: cudaFp8Utils.cu `scale<QUANTIZE>`) and a cuBLAS scaled GEMM (E4M3
products accumulated in fp32, times `input_scale * weight_scale`, rounded to the activation dtype), then adds the
bias in that dtype. TensorRT-LLM needs a GPU: `ScaledFp8Linear` computes the same on CPU (the reference `verify`
holds such a build to), and its `qdq` form is what ONNX gets: QuantizeLinear/DequantizeLinear on the input with
the file's `input_scale`, the file's E4M3 weight as an initializer behind a DequantizeLinear with its
`weight_scale` (no calibration, one byte per weight).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch

from stdrc.export.errors import CheckpointError, ExportError

FP8_E4M3_MAX = 448.0
REUSABLE_QUANT_ALGO = "FP8"  # ModelOpt's quant_algo for per-tensor E4M3 weights and static input scales


def quantize_e4m3(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """x / scale in fp32, saturated to +-448, rounded to E4M3 (TensorRT-LLM's static quantisation, ONNX Q/DQ).

    The division runs in fp32: rounding a bf16 quotient first would round twice.
    """
    return (x.float() / scale).clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)


@torch.library.custom_op("stdrc::fp8_qdq", mutates_args=())
def fp8_qdq(x: torch.Tensor, scale: float) -> torch.Tensor:
    """E4M3 quantize -> dequantize with a fixed per-tensor scale (saturating), as ONNX Q/DQ computes it."""
    q = (x / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return q.to(x.dtype) * scale


@fp8_qdq.register_fake
def _fp8_qdq_fake(x: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("stdrc::fp8_dq", mutates_args=())
def fp8_dq(weight: torch.Tensor, scale: float) -> torch.Tensor:
    """An E4M3 tensor times its scale, in fp32 (ONNX DequantizeLinear of an FP8 initializer)."""
    return weight.float() * scale


@fp8_dq.register_fake
def _fp8_dq_fake(weight: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.empty(weight.shape, dtype=torch.float32, device=weight.device)


def fp8_qdq_onnx(x: Any, scale: float) -> Any:
    """`stdrc::fp8_qdq` as ONNX: QuantizeLinear (FLOAT8E4M3FN, saturating) then DequantizeLinear."""
    import onnx_ir as ir
    from onnxscript import opset20 as op

    s = op.CastLike(op.Constant(value_float=scale), x)
    zero = op.Constant(value=ir.tensor(np.zeros((), np.uint8), dtype=ir.DataType.FLOAT8E4M3FN))
    return op.DequantizeLinear(op.QuantizeLinear(x, s, zero, saturate=1), s, zero)


def fp8_dq_onnx(weight: Any, scale: float) -> Any:
    """`stdrc::fp8_dq` as ONNX: DequantizeLinear of the FP8 initializer (TensorRT folds it into the GEMM)."""
    from onnxscript import opset20 as op

    return op.DequantizeLinear(weight, op.Constant(value_float=scale))


ONNX_TRANSLATIONS = {torch.ops.stdrc.fp8_qdq.default: fp8_qdq_onnx, torch.ops.stdrc.fp8_dq.default: fp8_dq_onnx}


def file_codes(weight: torch.Tensor, weight_scale: float, name: str = "linear") -> torch.Tensor:
    """The E4M3 codes of a dequantised pre-quantized weight (`codes.float() * weight_scale`), recovered exactly.

    Any other weight (a LoRA added after dequantisation, another file's weights) is an ExportError rather
    than a silent second rounding."""
    if not (math.isfinite(weight_scale) and weight_scale > 0):
        raise ExportError(f"{name}.weight_scale is {weight_scale}: FP8 scales must be positive and finite")
    weight = weight.detach().float()
    codes = quantize_e4m3(weight, weight_scale)
    if not torch.equal(codes.float() * weight_scale, weight):
        raise ExportError(f"{name}'s weights are not E4M3 codes at weight_scale {weight_scale:.6g}: they are "
                          "not the pre-quantized file's (requantise fused LoRAs with requantize_per_tensor)")
    return codes


class ScaledFp8Linear(torch.nn.Module):
    """ltx-core's `FP8Linear` on CPU: E4M3 weight [out, in] with its `weight_scale`, static `input_scale`.

    `forward` is fp8_scaled_mm's arithmetic (see the module docstring); with `qdq` set (`qdq_form`) it is the
    same computation written as Q/DQ ops for the ONNX exporter. Weights are buffers: `.to(dtype)` keeps FP8.
    """

    def __init__(self, weight: torch.Tensor, weight_scale: float, input_scale: float, bias: torch.Tensor | None):
        super().__init__()
        if weight.dtype != torch.float8_e4m3fn or weight.ndim != 2:
            raise ExportError(f"ScaledFp8Linear takes a 2-D float8_e4m3fn weight, not {weight.dtype} "
                              f"{list(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self.weight_scale, self.input_scale = float(weight_scale), float(input_scale)
        self.qdq = False
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @staticmethod
    def from_linear(linear: torch.nn.Linear, input_scale: float, weight_scale: float,
                    name: str = "linear") -> ScaledFp8Linear:
        """The file's E4M3 codes recovered from `linear`'s dequantised weight (`file_codes`)."""
        if not (math.isfinite(input_scale) and input_scale > 0):
            raise ExportError(f"{name}.input_scale is {input_scale}: FP8 scales must be positive and finite")
        return ScaledFp8Linear(file_codes(linear.weight, weight_scale, name), weight_scale, input_scale, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.qdq:
            weight = torch.ops.stdrc.fp8_dq(self.weight, self.weight_scale).to(x.dtype)
            return torch.nn.functional.linear(torch.ops.stdrc.fp8_qdq(x, self.input_scale), weight, self.bias)
        shape = x.shape
        xq = quantize_e4m3(x.reshape(-1, self.in_features), self.input_scale)
        out = (xq.float() @ self.weight.float().t()) * (self.input_scale * self.weight_scale)
        out = out.to(x.dtype)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"input_scale={self.input_scale:.4g}, weight_scale={self.weight_scale:.4g}")


def scale_layers(scales: Mapping[str, float]) -> dict[str, tuple[float, float]]:
    """`fp8_scales.json`'s mapping ("{layer}.input_scale" / ".weight_scale") -> layer: (input_scale, weight_scale)."""
    layers: dict[str, dict[str, float]] = {}
    for key, value in scales.items():
        layer, _, kind = key.rpartition(".")
        if kind not in ("input_scale", "weight_scale") or not layer:
            raise ExportError(f"FP8 scale {key!r} is neither a .input_scale nor a .weight_scale")
        layers.setdefault(layer, {})[kind] = value
    for layer, pair in layers.items():
        if len(pair) != 2:
            missing = "input_scale" if "input_scale" not in pair else "weight_scale"
            raise ExportError(f"FP8 scales have no {missing} for {layer}: the checkpoint is missing it")
    return {layer: (pair["input_scale"], pair["weight_scale"]) for layer, pair in sorted(layers.items())}


def scaled_linear(dit: torch.nn.Module, name: str) -> torch.nn.Linear:
    """The Linear a file's scales name: an ExportError when this DiT has none there (another model's scales)."""
    try:
        linear = dit.get_submodule(name)
    except AttributeError:
        linear = None
    if not isinstance(linear, torch.nn.Linear):
        raise ExportError(f"FP8 scales name {name}, which is not a Linear of this DiT: "
                          "the scales belong to another model")
    return linear


def scaled_fp8_dit(dit: torch.nn.Module, scales: Mapping[str, float]) -> torch.nn.Module:
    """A copy of `dit` (dequantised fp32 weights) whose Linears named in `scales` run as `ScaledFp8Linear`.

    `scales` decide which Linears are FP8: a pre-quantized file's own exclusion list, whatever it is. The
    other weights are shared with `dit`, not copied."""
    layers = scale_layers(scales)
    replaced = {}
    for name, (input_scale, weight_scale) in layers.items():
        linear = scaled_linear(dit, name)
        replaced[name] = ScaledFp8Linear.from_linear(linear, input_scale, weight_scale, name)
    shared = {id(t): t for t in (*dit.parameters(), *dit.buffers())}  # only the module tree is copied
    out = copy.deepcopy(dit, shared)
    for name, layer in replaced.items():
        parent, _, child = name.rpartition(".")
        setattr(out.get_submodule(parent) if parent else out, child, layer)
    return out.eval()


@contextlib.contextmanager
def qdq_form(module: torch.nn.Module) -> Iterator[int]:
    """Export-only: every `ScaledFp8Linear` of `module` computes through the Q/DQ ops; restored on exit."""
    layers = [m for m in module.modules() if isinstance(m, ScaledFp8Linear)]
    try:
        for m in layers:
            m.qdq = True
        yield len(layers)
    finally:
        for m in layers:
            m.qdq = False


def requantize_per_tensor(weight: torch.Tensor) -> tuple[torch.Tensor, float]:
    """ltx-core's per-tensor requantisation of a LoRA-fused weight (fp8_scaled_mm.py:76-104): scale = 448 /
    max|W| in fp32, codes = E4M3(W * scale), weight_scale = 1 / scale. Layout as given ([out, in] here)."""
    w = weight.float()
    scale = FP8_E4M3_MAX / torch.amax(torch.abs(w))
    codes = torch.clamp(w * scale, min=-FP8_E4M3_MAX, max=FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return codes, float(scale.reciprocal())


def file_scales(linear_scales: Mapping[str, Any], weight_scales: Mapping[str, float] | None = None,
                prefix: str = "ltx.") -> dict[str, float]:
    """A pre-quantized file's scales (`LazyCheckpoint.linear_scales`: Linear -> `LinearScales`) in
    `fp8_scales.json`'s format under our module names; `weight_scales` (Linear -> scale) replaces those of
    weights requantised after a LoRA (`Fp8LoraTransform.weight_scales`)."""
    weight_scales = weight_scales or {}
    out = {}
    for name, s in linear_scales.items():
        out[f"{prefix}{name}.input_scale"] = float(s.input_scale)
        out[f"{prefix}{name}.weight_scale"] = float(weight_scales.get(name, s.weight_scale))
    return out


def check_reusable_scales(quantization_metadata: str | None, path: Any) -> None:
    """`--precision fp8` reuses a file's scales only when they are ltx-core's fp8_scaled_mm kind: per-tensor
    E4M3 weights with static input scales (the tensors' side is checked as the header is read,
    export/fp8_source.py). A `_quantization_metadata` naming another algorithm (ModelOpt's `quant_algo`) is
    refused, from the header, before any weight is read."""
    try:
        meta = json.loads(quantization_metadata) if quantization_metadata else None
    except json.JSONDecodeError:
        return  # recorded, not interpreted: the tensors decide
    quant = meta.get("quantization") if isinstance(meta, dict) else None
    algo = quant.get("quant_algo") if isinstance(quant, dict) else None
    if algo is not None and algo != REUSABLE_QUANT_ALGO:
        raise CheckpointError(
            f"{path} is quantized as {algo} (its _quantization_metadata), not FP8 with per-tensor scales: "
            "--precision fp8 reuses only per-tensor E4M3 scales; build --precision bf16 or fp32 from it, or "
            "pass --calibrate-fp8 to calibrate new scales")
