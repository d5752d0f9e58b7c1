"""Lightricks' pre-quantized FP8 checkpoints (ltx-core's `fp8_scaled_mm` format), recognised from the header.

Per quantized Linear `<name>` the file holds `<name>.weight` as float8_e4m3fn in [out, in] layout,
`<name>.weight_scale` an fp32 scalar (the dequantisation multiplier: W = weight.float() * weight_scale),
`<name>.input_scale` an fp32 scalar (the static activation scale) and the bias in bf16
(ltx-core quantization/fp8_scaled_mm.py: `FP8Linear`, `quantize_weight_to_fp8_per_tensor`); the safetensors
metadata carries `_quantization_metadata` beside `config`. Which Linears stay bf16 is ltx-core's policy
(`export.dit.fp8_policy_excluded`); a file's own choice is whatever it quantized.

A float8 weight is never cast raw (a weight whose true max is 0.11 would come back 448: ~4000x too large):
every one needs its scales, and the scales (scalars, a few bytes each) are read and checked with the
header, so a file with a missing or bad scale is refused before any weight is read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from stdrc.export.errors import CheckpointError
from stdrc.runtime.vocab import SOURCE_QUANT_FORMATS, WEIGHT_LAYOUTS

FP8_DTYPE = "F8_E4M3"  # safetensors' name for float8_e4m3fn, the only float8 ltx-core's files use
E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max: scale = max|W| / E4M3_MAX
(FORMAT,) = SOURCE_QUANT_FORMATS  # per-tensor weight and input scales, as ltx-core's fp8_scaled_mm reads
QUANT_METADATA = "_quantization_metadata"
WEIGHT_SCALE, INPUT_SCALE = "weight_scale", "input_scale"
OUT_IN, IN_OUT = WEIGHT_LAYOUTS  # ltx-core's files are [out, in]; some conversions store [in, out]
_SCALE_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}
_FIX = "re-download the file or use the bf16 checkpoint"
_LISTED = 3
_DEQUANT_ROWS = 1024  # rows dequantised at a time into a lower precision (a 4096-wide block: 16 MiB of fp32)


@dataclass(frozen=True)
class LinearScales:
    """One quantized Linear's scales, as floats."""

    weight_scale: float  # dequantisation multiplier
    input_scale: float  # static activation scale (x_q = x / input_scale)


@dataclass(frozen=True)
class FP8Source:
    """What a pre-quantized file is: its format, weight layout, per-Linear scales and quantisation metadata."""

    format: str
    layout: str  # OUT_IN or IN_OUT, for every quantized weight of the file
    scales: dict[str, LinearScales]  # file key of the Linear (its weight key minus `.weight`) -> scales
    quantization_metadata: str | None = None  # the `_quantization_metadata` text (JSON), as the file has it

    def scale_keys(self) -> set[str]:
        """The scale tensors' file keys: consumed here, never loaded as weights."""
        return {f"{n}.{s}" for n in self.scales for s in (WEIGHT_SCALE, INPUT_SCALE)}

    def scales_of(self, weight_key: str) -> LinearScales | None:
        """The scales of the float8 weight at file key `weight_key` (None: not a quantized weight)."""
        return self.scales.get(weight_key.removesuffix(".weight")) if weight_key.endswith(".weight") else None

    def record(self) -> dict[str, Any]:
        """The manifest's account of the source (runtime/schema.py `SourceQuantization`'s fields)."""
        return {"format": self.format, "layout": self.layout, "quantized_linears": len(self.scales),
                "metadata": self.quantization_metadata}


def _listed(items: list[str]) -> str:
    more = f" (+{len(items) - _LISTED} more)" if len(items) > _LISTED else ""
    return ", ".join(items[:_LISTED]) + more


def _read_scale(fh: BinaryIO, base: int, key: str, info: dict, path: Path) -> float:
    """A scalar scale tensor's value (its few bytes); not finite, <= 0 or not a scalar: refused."""
    dtype = _SCALE_DTYPES.get(info["dtype"])
    start, end = info["data_offsets"]
    if dtype is None or math.prod(info["shape"]) != 1:
        raise CheckpointError(f"{path} holds {key} as {info['dtype']} {info['shape']}, not a float scalar: "
                              f"the FP8 file is not in ltx-core's format; {_FIX}")
    fh.seek(base + start)
    raw = fh.read(end - start)
    if len(raw) != end - start:
        raise CheckpointError(f"{path} ends inside {key}: the file is truncated; {_FIX}")
    value = float(torch.frombuffer(bytearray(raw), dtype=dtype).float().item())
    if not math.isfinite(value) or value <= 0:
        raise CheckpointError(f"{path} holds {key} = {value}, not a finite positive scale: {_FIX}")
    return value


def _layout(path: Path, header: dict[str, Any], weights: list[str]) -> str:
    """[out, in] or [in, out], told by each weight's bias length (a square weight fits both); a weight that
    fits neither, or a file mixing the two, is refused."""
    votes: dict[str, list[str]] = {OUT_IN: [], IN_OUT: []}
    for key in weights:
        rows, cols = header[key]["shape"]
        bias = header.get(key.removesuffix(".weight") + ".bias")
        if bias is None or rows == cols:
            continue
        (out,) = bias["shape"] if len(bias["shape"]) == 1 else (None,)
        if out == rows:
            votes[OUT_IN].append(key)
        elif out == cols:
            votes[IN_OUT].append(key)
        else:
            raise CheckpointError(
                f"{path}: float8 weight {key} {rows}x{cols} matches neither [out, in] nor [in, out] for its "
                f"bias of {bias['shape']}: the FP8 file is not in ltx-core's format; {_FIX}")
    if votes[OUT_IN] and votes[IN_OUT]:
        raise CheckpointError(
            f"{path} mixes float8 weight layouts ([out, in]: {_listed(votes[OUT_IN])}; [in, out]: "
            f"{_listed(votes[IN_OUT])}): the FP8 file is not in ltx-core's format; {_FIX}")
    return IN_OUT if votes[IN_OUT] else OUT_IN


def detect_fp8(path: Path, header: dict[str, Any], fh: BinaryIO, base: int) -> FP8Source | None:
    """The file's FP8 facts from its parsed safetensors `header` (None: not a quantized file); `fh` at data
    offset `base` is read for the scalar scales only. Every inconsistency is one CheckpointError."""
    meta = header.get("__metadata__") or {}
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    float8 = sorted(k for k, v in tensors.items() if v["dtype"].startswith("F8_"))
    scale_keys = sorted(k for k in tensors if k.endswith((f".{WEIGHT_SCALE}", f".{INPUT_SCALE}")))
    if not (float8 or scale_keys or QUANT_METADATA in meta):
        return None
    other = [f"{k} ({tensors[k]['dtype']})" for k in float8 if tensors[k]["dtype"] != FP8_DTYPE]
    if other:
        raise CheckpointError(f"{path} holds float8 tensors other than float8_e4m3fn ({_listed(other)}), a "
                              "format stdrc does not read: use Lightricks' FP8 (e4m3) file or the bf16 one")
    odd = [k for k in float8 if not k.endswith(".weight") or len(tensors[k]["shape"]) != 2]
    if odd:
        raise CheckpointError(f"{path} holds float8 tensors that are not Linear weights ({_listed(odd)}), and a "
                              f"float8 tensor is never cast raw: the file is not in ltx-core's format; {_FIX}")
    if not float8:
        what = "scale tensors" if scale_keys else f"`{QUANT_METADATA}`"
        raise CheckpointError(f"{path} has {what} but no float8_e4m3fn weight: it is quantized in a format "
                              "stdrc does not read; use Lightricks' FP8 file or the bf16 one")
    names = [k.removesuffix(".weight") for k in float8]
    missing = [f"{n}.{s}" for n in names for s in (WEIGHT_SCALE, INPUT_SCALE) if f"{n}.{s}" not in tensors]
    if missing:
        raise CheckpointError(f"{path} is an FP8 file missing {len(missing)} scale tensor(s) ({_listed(missing)}), "
                              f"and a float8 weight is never read without its scale: {_FIX}")
    orphans = sorted(set(scale_keys) - {f"{n}.{s}" for n in names for s in (WEIGHT_SCALE, INPUT_SCALE)})
    if orphans:
        raise CheckpointError(f"{path} holds scales of weights that are not float8 ({_listed(orphans)}): the FP8 "
                              f"file is not in ltx-core's format; {_FIX}")
    layout = _layout(path, tensors, float8)
    scales = {n: LinearScales(*(_read_scale(fh, base, f"{n}.{s}", tensors[f"{n}.{s}"], path)
                                for s in (WEIGHT_SCALE, INPUT_SCALE))) for n in names}
    return FP8Source(FORMAT, layout, scales, meta.get(QUANT_METADATA))


def dequantize(weight: torch.Tensor, scales: LinearScales, layout: str,
               dtype: torch.dtype | None = None) -> torch.Tensor:
    """One float8 weight as [out, in]: `weight.float() * weight_scale` (ltx-core's fuse_loras
    `_fuse_delta_with_scaled_fp8` dequantises so), transposed from an [in, out] file. `dtype` (not fp32):
    the fp32 product cast to it, computed in blocks of rows, so no whole fp32 copy is held."""
    weight = weight.t() if layout == IN_OUT else weight
    if dtype is None or dtype == torch.float32:
        return (weight.to(torch.float32) * scales.weight_scale).contiguous()
    out = torch.empty(weight.shape, dtype=dtype)
    for start in range(0, weight.shape[0], _DEQUANT_ROWS):
        rows = slice(start, start + _DEQUANT_ROWS)
        out[rows] = weight[rows].to(torch.float32) * scales.weight_scale
    return out


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(float8_e4m3fn [out, in], weight_scale = max|W| / 448) of one weight, per tensor, with ltx-core's
    arithmetic (`quantize_weight_to_fp8_per_tensor`: W * (448 / max|W|), scale its fp32 reciprocal), before
    its transpose to the cuBLAS layout: synthetic FP8 files."""
    w = weight.to(torch.float32)
    amax = w.abs().max()
    inverse = E4M3_MAX / amax if amax > 0 else torch.tensor(1.0)
    return (w * inverse).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), float(inverse.reciprocal())
