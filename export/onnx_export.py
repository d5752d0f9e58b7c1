"""Trace a component to ONNX with the dynamo exporter, check it, write it atomically.

Measured on ltx-core: the legacy TorchScript exporter fails on `rms_norm` and silently
mis-exports split RoPE (in-place `addcmul_` on views), so only the dynamo exporter is used,
and every export is checked against PyTorch by `verify`.
"""

from __future__ import annotations

import inspect
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import onnx
import torch

from stdrc.export.attention import OPSET, fused_attention, translation_table
from stdrc.export.errors import ExportError
from stdrc.export.specs import ComponentSpec
from stdrc.runtime.manifest import SPACE_SCALE

log = logging.getLogger(__name__)
TWO_GB = 2 * 1024**3  # protobuf's message limit: an ONNX file past it keeps its weights as external data
PIXEL_DIMS = {"height", "width"}  # symbolic image sizes (the VAE encoder's), multiples of SPACE_SCALE
# Weights above this go to one external file: engine builds then edit the graph without reading them
# (engines/onnxruntime.py), and the file moves into the bundle as it is. Below it, one inline file.
EXTERNAL_MIN_BYTES = 256 * 1024**2


def dynamic_shapes(spec: ComponentSpec) -> tuple | None:
    """torch.export dims for every symbolic input dim named in `spec.dynamic_dims` (one Dim per name)."""
    if not spec.dynamic_dims:
        return None
    dims = {name: torch.export.Dim(name, min=lo, max=hi) for name, (lo, _, hi) in spec.dynamic_dims.items()
            if name not in PIXEL_DIMS}
    for name in PIXEL_DIMS & set(spec.dynamic_dims):  # pixels: a multiple of 32, a derived dim
        lo, _, hi = spec.dynamic_dims[name]
        dims[name] = SPACE_SCALE * torch.export.Dim(f"latent_{name}", min=lo // SPACE_SCALE, max=hi // SPACE_SCALE)
    return tuple({axis: dims[d] for axis, d in enumerate(t.shape) if isinstance(d, str)} for t in spec.inputs)


class CastIO(torch.nn.Module):
    """A module whose weights are fp16/bf16 behind fp32 inputs and outputs: the ONNX is written in the
    engine precision directly (no fp32 copy of the weights, on disk or in memory), its interface unchanged.

    A module with `native_outputs` keeps its outputs in its dtype (`TextStates`: half the bytes crossing to the
    text head). Inputs the module names in `fp32_inputs` (forward parameter names) stay fp32: the DiT's timestep is
    scaled by 1000 before ltx-core's fp32 sinusoid, and an fp16 sigma there costs its embedding 2e-2 rel L2."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module
        self.dtype = next(module.parameters()).dtype
        names = list(inspect.signature(module.forward).parameters)
        self.keep = {names.index(n) for n in getattr(module, "fp32_inputs", ())}

    def forward(self, *args: torch.Tensor):
        cast = [a.to(self.dtype) if a.is_floating_point() and i not in self.keep else a
                for i, a in enumerate(args)]
        out = self.module(*cast)
        if getattr(self.module, "native_outputs", False):  # hidden states crossing to the next engine as they are
            return tuple(out)
        if isinstance(out, (tuple, list)):
            return tuple(o.float() if o.is_floating_point() else o for o in out)
        return out.float()


def param_bytes(module: torch.nn.Module) -> int:
    seen = {id(t): t for t in list(module.parameters()) + list(module.buffers())}
    return sum(t.numel() * t.element_size() for t in seen.values())


def export_onnx(module: torch.nn.Module, spec: ComponentSpec, path: str | Path, seed: int = 0,
                attention: str = "ort") -> Path:
    """Export `module` (forward takes the spec's inputs in order) to `path`; external data when large.

    `attention`: how ltx-core attention layers appear in the graph (export/attention.py): ``ort`` for
    ONNX Runtime, ``onnx`` (opset 23 `Attention`) for TensorRT, ``unfused`` for the decomposed baseline.
    """
    path = Path(path)
    args = spec.torch_inputs(seed=seed)
    external = param_bytes(module) > EXTERNAL_MIN_BYTES
    shapes = dynamic_shapes(spec)
    if isinstance(module, CastIO) and shapes is not None:
        shapes = (shapes,)  # CastIO.forward(*args): one structure for the varargs
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{spec.name}.", dir=path.parent))
    try:
        tmp = tmpdir / path.name
        with warnings.catch_warnings(), torch.no_grad(), fused_attention(module, attention):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module.eval(),
                args,
                input_names=[t.name for t in spec.inputs],
                output_names=[t.name for t in spec.outputs],
                dynamic_shapes=shapes,
                dynamo=True,
                opset_version=OPSET[attention],
                custom_translation_table=translation_table(attention),
                optimize=True,
                verbose=False,
            )
            program.save(str(tmp), external_data=external)
        onnx.checker.check_model(str(tmp), full_check=False)
        for f in tmpdir.iterdir():
            os.replace(f, path.parent / f.name)
    except ExportError:
        raise
    except Exception as e:
        raise ExportError(f"ONNX export of {spec.name} failed: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    log.info("exported %s -> %s%s", spec.name, path, " (+external data)" if external else "")
    return path


def onnx_files(path: str | Path) -> list[Path]:
    """The model file and any external-data files it references."""
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    extra = set()
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                extra.add(path.parent / entry.value)
    return [path, *sorted(extra)]
