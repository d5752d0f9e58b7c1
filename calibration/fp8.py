"""FP8 (E4M3, per-tensor max) post-training quantization of the DiT with nvidia-modelopt.

On CPU modelopt runs FP8 as fake quantization (quantize -> dequantize in fp32), which is what
calibration and the error measurement need. Layers whose errors reach every token unattenuated
(input/output projections, timestep and caption embedders) stay in high precision.

The Q/DQ ONNX for TensorRT is written with the dynamo exporter, like every other export here:
each calibrated quantizer is swapped, for the export only, for a `stdrc::fp8_qdq` op with its
scale baked in, translated to standard ONNX QuantizeLinear/DequantizeLinear (FLOAT8E4M3FN).
(modelopt's own symbolic functions serve only the legacy TorchScript exporter, which fails on
ltx-core's `rms_norm`; its dynamo path leaves fake tensors in the graph.)
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stdrc.export.dit import (
    DIT_INPUTS,
    DIT_OUTPUTS,
    SENSITIVE_LAYER_PATTERNS,
    STDRCTransformer,
    sensitive_layer_patterns,
)
from stdrc.export.errors import ExportError
from stdrc.export.fp8_scaled import FP8_E4M3_MAX, ONNX_TRANSLATIONS, fp8_qdq, qdq_form  # noqa: F401 (fp8_qdq: API)
from stdrc.export.onnx_export import TWO_GB, param_bytes
from stdrc.export.specs import SIGMA_INPUT

log = logging.getLogger(__name__)

ONNX_OPSET = 20  # FP8 QuantizeLinear needs >= 19


def _mtq() -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # modelopt warns about untested transformers versions
            import modelopt.torch.quantization as mtq
    except ImportError as e:
        raise ExportError(f"FP8 calibration needs nvidia-modelopt ({e}): pip install 'stdrc[fp8]'") from e
    return mtq


def fp8_config(patterns: tuple[str, ...] = SENSITIVE_LAYER_PATTERNS) -> dict[str, Any]:
    """modelopt's FP8 default (E4M3 per-tensor weights and inputs, max calibration) minus the layers matching
    `patterns` (`sensitive_layer_patterns(dit)` for a given DiT)."""
    cfg = copy.deepcopy(_mtq().FP8_DEFAULT_CFG)
    keep = [{"quantizer_name": pattern, "enable": False} for pattern in patterns]
    cfg["quant_cfg"] = list(cfg["quant_cfg"]) + keep  # later entries win
    return cfg


def quantize_dit_fp8(dit: STDRCTransformer, calib_batches: list[dict[str, torch.Tensor]]) -> torch.nn.Module:
    """A calibrated FP8 copy of `dit` (the original is untouched): one forward per batch sets the maxima."""
    if not calib_batches:
        raise ExportError("FP8 calibration needs at least one batch: see stdrc.calibration.capture")
    mtq = _mtq()
    qdit = copy.deepcopy(dit).eval()

    def forward_loop(model: torch.nn.Module) -> None:
        with torch.no_grad():
            for batch in calib_batches:
                model(**batch)

    with contextlib.redirect_stdout(io.StringIO()) as out:  # modelopt prints its progress
        qdit = mtq.quantize(qdit, fp8_config(sensitive_layer_patterns(dit)), forward_loop=forward_loop)
    log.debug("modelopt: %s", out.getvalue().strip())
    log.info("FP8 calibration: %d quantized linears over %d batches",
             len(quantized_layers(qdit)), len(calib_batches))
    return qdit


def _quantizers(module: torch.nn.Module) -> Iterator[tuple[str, Any]]:
    from modelopt.torch.quantization.nn import TensorQuantizer

    for name, child in module.named_modules():
        if isinstance(child, TensorQuantizer):
            yield name, child


def quantized_layers(qdit: torch.nn.Module) -> list[str]:
    """Module paths whose weight and input quantizers are both enabled."""
    enabled = {name for name, q in _quantizers(qdit) if q.is_enabled}
    return sorted(
        name for name, _ in qdit.named_modules()
        if f"{name}.weight_quantizer" in enabled and f"{name}.input_quantizer" in enabled
    )


def rel_l2(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """||a - b|| / ||b|| in float64; `b` is the reference."""
    a64 = np.asarray(a.detach().cpu() if isinstance(a, torch.Tensor) else a, dtype=np.float64)
    b64 = np.asarray(b.detach().cpu() if isinstance(b, torch.Tensor) else b, dtype=np.float64)
    return float(np.linalg.norm(a64 - b64) / max(np.linalg.norm(b64), 1e-30))


def fp8_dit_error(
    dit: torch.nn.Module, qdit: torch.nn.Module, batches: list[dict[str, torch.Tensor]]
) -> float:
    """Relative L2 of the FP8 DiT's velocity against fp32, over one forward per batch."""
    with torch.no_grad():
        ref = torch.cat([dit(**b).flatten() for b in batches])
        out = torch.cat([qdit(**b).flatten() for b in batches])
    return rel_l2(out, ref)


def amax_scales(qdit: torch.nn.Module) -> dict[str, float]:
    """Per-tensor dequantization scales (amax / 448) as ltx-core's FP8 layers name them.

    "{layer}.input_scale" and "{layer}.weight_scale": the `scale_a` / `scale_b` of
    `torch._scaled_mm(x_fp8, w_fp8.t(), scale_a, scale_b)`.
    """
    scales = {}
    for name, q in _quantizers(qdit):
        layer, _, kind = name.rpartition(".")
        if kind not in ("input_quantizer", "weight_quantizer") or not q.is_enabled or q.amax is None:
            continue
        scales[f"{layer}.{kind.removesuffix('_quantizer')}_scale"] = float(q.amax) / FP8_E4M3_MAX
    return scales


@contextlib.contextmanager
def qdq_export_patch(module: torch.nn.Module) -> Iterator[int]:
    """Export-only: each calibrated quantizer becomes `stdrc::fp8_qdq` with its scale; restored on exit."""
    patched = []
    try:
        for name, q in _quantizers(module):
            if not q.is_enabled:
                continue
            if q.amax is None:
                raise ExportError(f"quantizer {name} has no calibrated amax: run quantize_dit_fp8 first")
            scale = float(q.amax) / FP8_E4M3_MAX
            q.forward = lambda x, s=scale: torch.ops.stdrc.fp8_qdq(x, s)
            patched.append(q)
        yield len(patched)
    finally:
        for q in patched:
            del q.forward


def export_qdq_onnx(
    qdit_baked: torch.nn.Module,
    path: str | os.PathLike,
    example_inputs: dict[str, torch.Tensor],
    batch_range: tuple[int, int] | None = None,
) -> Path:
    """Write the quantized DiT (RoPE baked) as ONNX with FP8 Q/DQ nodes, for a strongly typed TensorRT build.

    The DiT is modelopt's calibrated one or one whose Linears are `ScaledFp8Linear` (a pre-quantized file's
    scales): its E4M3 weights become FP8 initializers behind DequantizeLinear.

    `batch_range=(min, max)` makes axis 0 of every input dynamic, as the DiT spec's "batch" dim.
    """
    path = Path(path)
    names = [n for n in (*DIT_INPUTS, SIGMA_INPUT) if n in example_inputs] or list(example_inputs)
    args = tuple(example_inputs[n] for n in names)
    dynamic = None
    if batch_range is not None:
        batch = torch.export.Dim("batch", min=batch_range[0], max=batch_range[1])
        dynamic = tuple({0: batch} for _ in names)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.stem}.", dir=path.parent))
    try:
        with qdq_export_patch(qdit_baked) as calibrated, qdq_form(qdit_baked) as given, \
                warnings.catch_warnings(), torch.no_grad():
            count = calibrated + given
            if count == 0:
                raise ExportError("the module has no enabled FP8 quantizers: pass the output of quantize_dit_fp8 "
                                  "(or of export.fp8_scaled.scaled_fp8_dit, a pre-quantized file's scales)")
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                qdit_baked.eval(), args, input_names=names, output_names=list(DIT_OUTPUTS),
                dynamic_shapes=dynamic, dynamo=True, optimize=True, verbose=False, opset_version=ONNX_OPSET,
                custom_translation_table=ONNX_TRANSLATIONS,
            )
        program.save(str(tmpdir / path.name), external_data=param_bytes(qdit_baked) > TWO_GB // 2)
        import onnx

        onnx.checker.check_model(str(tmpdir / path.name))
        for f in tmpdir.iterdir():
            os.replace(f, path.parent / f.name)
    except ExportError:
        raise
    except Exception as e:
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        raise ExportError(f"Q/DQ ONNX export of the FP8 DiT failed: {reason}") from e
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    log.info("exported FP8 Q/DQ DiT (%d quantizers) -> %s", count, path)
    return path
