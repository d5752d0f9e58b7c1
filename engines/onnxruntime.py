"""ONNX Runtime engines: fp32 optimised offline for CPU; fp16 for the CUDA EP, optimised by it at load.

The CPU-side offline pass must not touch an fp16 graph: the CPU EP lacks fp16 kernels for most
ops and wraps each in Casts back to float, so the saved "fp16" engine would compute in fp32.
fp16 graphs (exported with fp16 weights, as build-engines writes them, or converted from fp32) get
their RMS norms fused into `SimplifiedLayerNormalization` (statistics in fp32, whatever the input type)
on the graph alone: the exported external weights file goes into the bundle as it is (moved or
hard-linked), never loaded. An fp16 export is not converted: its fp32 values are where torch computes
in fp32, and they stay so (`to_fp16`).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper
from onnx.external_data_helper import load_external_data_for_tensor

from stdrc.export.errors import ExportError
from stdrc.export.onnx_export import TWO_GB
from stdrc.runtime.schema import BuildFacts
from stdrc.runtime.vocab import BACKEND_PRECISIONS

log = logging.getLogger(__name__)
PRECISIONS = BACKEND_PRECISIONS["onnxruntime"]
GB = 1024**3


def uses_external_data(path: Path) -> bool:
    model = onnx.load(str(path), load_external_data=False)
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def _inline_float_externals(model: onnx.ModelProto, base_dir: Path) -> int:
    """Read external fp32 initializers inline (the converter halves them there); fp16 ones stay unread."""
    read = 0
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL and tensor.data_type == onnx.TensorProto.FLOAT:
            load_external_data_for_tensor(tensor, str(base_dir))
            read += len(tensor.raw_data)
    return read


def external_files(model: onnx.ModelProto) -> set[str]:
    """The external-data file names the graph's initializers reference (relative to the model)."""
    return {e.value for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
            for e in t.external_data if e.key == "location"}


def check_external_data(model: onnx.ModelProto, base_dir: Path, found: dict[str, Path] | None = None) -> None:
    """Every external initializer's bytes exist where the graph says, with its dtype's size: no weight read.

    `found`: files (by location) that lie elsewhere than `base_dir` for now."""
    sizes: dict[str, int] = {}
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        name = info["location"]
        if name not in sizes:
            sizes[name] = ((found or {}).get(name) or base_dir / name).stat().st_size
        itemsize = helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        want = int(np.prod(tensor.dims, dtype=np.int64)) * itemsize
        offset, length = int(info.get("offset", 0)), int(info.get("length", want))
        if length != want or offset + length > sizes[name]:
            raise ExportError(f"external data of {tensor.name} in {name} is {length} bytes at {offset}, "
                              f"file {sizes[name]}: expected {want}; re-export (delete the stage cache entry)")


def _weightless(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph with external initializers as graph inputs of the same type and shape: loads without weights."""
    light = onnx.ModelProto()
    light.CopyFrom(model)  # external tensors hold no bytes: this copies the graph only
    keep = [t for t in light.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
    moved = [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
             for t in light.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    del light.graph.initializer[:]
    light.graph.initializer.extend(keep)
    light.graph.input.extend(moved)
    return light


def _place(names: set[str], src_dir: Path, dst_dir: Path, move: bool) -> None:
    """The exported external data goes into the bundle as it is: moved or hard-linked, copied only across disks."""
    for name in names:
        src, dst = src_dir / name, dst_dir / name
        if src.resolve() == dst.resolve():
            continue
        dst.unlink(missing_ok=True)
        if move:
            shutil.move(src, dst)
            continue
        try:
            os.link(src, dst)
        except OSError:
            log.info("%s: no hard link across file systems, copying", name)
            shutil.copyfile(src, dst)


RMS_NORM_CHAIN = ("Pow", "ReduceMean", "Add", "Sqrt", "Reciprocal", "Mul")  # x * rsqrt(mean(x^2) + eps)


class _Consts(dict):
    """Constant values by name, read on first use: the exponent and eps scalars, never the weights."""

    def __init__(self, graph: onnx.GraphProto, base_dir: Path):
        super().__init__()
        self.tensors = {t.name: t for t in graph.initializer}
        self.tensors.update({n.output[0]: n.attribute[0].t for n in graph.node
                             if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"})
        self.base_dir = str(base_dir)

    def __contains__(self, name: object) -> bool:
        tensor = self.tensors.get(name)  # type: ignore[arg-type]
        return tensor is not None and np.prod(tensor.dims, dtype=np.int64) <= 1

    def __missing__(self, name: str) -> np.ndarray:
        self[name] = numpy_helper.to_array(self.tensors[name], base_dir=self.base_dir)
        return self[name]

    def get(self, name: str, default: object = None) -> object:  # type: ignore[override]
        return self[name] if name in self else default


def _fuse_plain_rms_norms(model: onnx.ModelProto, base_dir: Path = Path(), shared_only: bool = False) -> int:
    """RMS norms without a weight (ORT's fusion needs one) -> SimplifiedLayerNormalization with a ones scale.

    `shared_only`: only norms whose output has several consumers. The exporter merges identical norms: on
    LTX-2.3's text side, Gemma's first weighted norm and the V2 feature extractor's plain one of the same
    embeddings are one `x * rsqrt(...)` feeding both; ORT's weighted fusion then deletes that shared node
    and leaves the other consumer unfed (ORT: "Graph is not a DAG"). Fused first, it keeps its output."""
    graph = model.graph
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    consts = _Consts(graph, base_dir)
    values = {v.name: v.type.tensor_type for v in [*graph.value_info, *graph.input]}
    fused, drop = 0, set()
    for pow_node in [n for n in graph.node if n.op_type == "Pow"]:
        chain, node = [pow_node], pow_node
        while len(chain) < len(RMS_NORM_CHAIN):
            users = consumers.get(node.output[0], [])
            if len(users) != 1 or users[0].op_type != RMS_NORM_CHAIN[len(chain)]:
                break
            node = users[0]
            chain.append(node)
        x = pow_node.input[0]
        dims = values[x].shape.dim if x in values else None
        if (len(chain) < len(RMS_NORM_CHAIN) or set(chain[-1].input) != {x, chain[-2].output[0]}
                or not dims or not dims[-1].dim_value or float(consts.get(pow_node.input[1], 0)) != 2.0):
            continue
        eps = next((consts[i] for i in chain[2].input if i in consts), None)
        if eps is None or eps.size != 1 or (shared_only and len(consumers.get(chain[-1].output[0], [])) < 2):
            continue
        dtype = helper.tensor_dtype_to_np_dtype(values[x].elem_type)  # the scale's type is the output's
        scale = numpy_helper.from_array(np.ones(dims[-1].dim_value, dtype), f"{chain[-1].name}_ones_scale")
        graph.initializer.append(scale)
        graph.node.append(helper.make_node(
            "SimplifiedLayerNormalization", [x, scale.name], [chain[-1].output[0]], name=f"{chain[-1].name}_rmsnorm",
            axis=-1, epsilon=float(eps), stash_type=1))
        drop.update(id(n) for n in chain)
        fused += 1
    kept = [n for n in graph.node if id(n) not in drop]
    del graph.node[:]
    graph.node.extend(kept)
    return fused


def exported_in_fp16(model: onnx.ModelProto) -> bool:
    """Written from fp16 weights (export/onnx_export.py CastIO): its fp32 values are where torch upcasts."""
    return any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)


def to_fp16(model: onnx.ModelProto, base_dir: Path = Path()) -> onnx.ModelProto:
    """fp16 compute with fp32 graph inputs/outputs and RMS-norm statistics in fp32 (fused norms).

    A graph exported in fp16 keeps its dtypes: where torch upcasts (RoPE angles -> Cos/Sin, norm and
    masked-mean statistics) the export computes in fp32, and a float16 converter would halve those islands
    too (it rewrites every Cast to float and every float value; issue 11: text encoder rel L2 1.3e-3 as
    exported, 1.85e-2 converted). Only an fp32 graph goes through the converter (its islands are invisible).
    Works on the graph: external fp16 weights stay where they are (unread); only fp32 initializers
    are read (to be halved) and `base_dir` is where the scalar constants' external data lies."""
    from onnxruntime.transformers.fusion_simplified_layernorm import FusionSimplifiedLayerNormalization
    from onnxruntime.transformers.onnx_model import OnnxModel

    convert = not exported_in_fp16(model)
    if convert:
        halved = _inline_float_externals(model, base_dir)
        if halved > TWO_GB // 2:
            log.warning("%.1f GB of external fp32 weights read to convert to fp16: export in fp16 instead",
                        halved / GB)
    wrapped = OnnxModel(model)
    _fuse_plain_rms_norms(wrapped.model, base_dir, shared_only=True)  # before ORT's fusion can cut them
    FusionSimplifiedLayerNormalization(wrapped).apply()  # norms with a weight
    wrapped.prune_graph(allow_remove_graph_inputs=False)  # the manifest lists every input (an unused timestep)
    _fuse_plain_rms_norms(wrapped.model, base_dir)
    if not any(o.domain == "com.microsoft" for o in wrapped.model.opset_import):
        wrapped.model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    if not convert:
        wrapped.topological_sort()  # the fused norms are appended at the end
        return wrapped.model
    from onnxruntime.transformers.float16 import convert_float_to_float16

    half = OnnxModel(convert_float_to_float16(wrapped.model, keep_io_types=True))
    half.topological_sort()  # the converter appends its input/output casts at the end
    return half.model


def _fp16_engine(onnx_path: Path, out_path: Path, tmp: Path, move: bool) -> None:
    """The fp16 graph edits on the graph alone; the exported weights file is reused, never read or rewritten.

    Host memory stays at the graph's size whatever the model's (issue 11: a 12B text encoder builds in
    well under its own weight bytes). Checked by ORT on the graph with the weights as inputs, and by the
    external data's sizes against the graph's declared tensors."""
    model = to_fp16(onnx.load(str(onnx_path), load_external_data=False), onnx_path.parent)
    reused = external_files(model)
    # fp32 tensors halved above (inline now) go to a new file beside the reused one when large
    external = bool(reused) or model.ByteSize() > TWO_GB // 2
    (out_path.parent / (out_path.name + ".fp16.data")).unlink(missing_ok=True)  # onnx.save appends to one
    onnx.save(model, str(tmp), save_as_external_data=external, location=out_path.name + ".fp16.data",
              size_threshold=1024**2)
    check = ort.SessionOptions()  # ORT, not onnx.checker: SimplifiedLayerNormalization is ORT's own op
    check.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    check.log_severity_level = 3
    saved = onnx.load(str(tmp), load_external_data=False)
    try:
        ort.InferenceSession(_weightless(saved).SerializeToString(), check, providers=["CPUExecutionProvider"])
        check_external_data(saved, out_path.parent, {name: onnx_path.parent / name for name in reused})
    except Exception:
        (out_path.parent / (out_path.name + ".fp16.data")).unlink(missing_ok=True)  # written by this save only
        raise
    _place(reused, onnx_path.parent, out_path.parent, move)
    os.chmod(tmp, 0o644)
    os.replace(tmp, out_path)


def build_ort_engine(onnx_path: Path, out_path: Path, precision: str = "fp32",
                     move: bool = False) -> BuildFacts:
    """Optimise `onnx_path` (ORT 'extended' level: portable across CPUs) and save it at `out_path`.

    `move`: the exported external data may be moved into the bundle (fp16; the export is not cached)."""
    if precision not in PRECISIONS:
        raise ExportError(f"ONNX Runtime engines are {' or '.join(PRECISIONS)}, not {precision}: "
                          "use --precision fp32 (CPU) or fp16 (CUDA EP); FP8 needs --backend tensorrt")
    fd, tmp = tempfile.mkstemp(prefix=f".{out_path.stem}.", suffix=".onnx", dir=out_path.parent)
    os.close(fd)
    try:
        if precision == "fp16":  # no CPU-side pass: the CUDA EP optimises the fp16 graph at load
            _fp16_engine(onnx_path, out_path, Path(tmp), move)
            return BuildFacts(onnxruntime_version=ort.__version__,
                              graph_optimization_level="at load (target provider)")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = tmp
        if uses_external_data(onnx_path):
            options.add_session_config_entry(
                "session.optimized_model_external_initializers_file_name", out_path.name + ".data")
            options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        options.log_severity_level = 3
        ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        onnx.checker.check_model(tmp)  # by path: works past 2 GB
        os.chmod(tmp, 0o644)
        os.replace(tmp, out_path)
    except ExportError:
        raise
    except Exception as e:
        first = str(e).splitlines()[0]
        if "write" in first.lower():  # ORT names no OS reason; a full disk is the usual one
            free = shutil.disk_usage(out_path.parent).free
            first += f" ({free / 2**30:.1f} GB free on the disk of {out_path.parent}: free space or build elsewhere)"
        raise ExportError(f"ONNX Runtime could not optimise {onnx_path.name}: {first}") from e
    finally:
        Path(tmp).unlink(missing_ok=True)
    return BuildFacts(onnxruntime_version=ort.__version__, graph_optimization_level="extended")


def store_bf16_weights(path: Path, min_elements: int = 1024) -> int:
    """fp32 initializers whose every value is a bfloat16 value (weights read from a bf16 file) stored as bf16
    behind a Cast to float, so an fp32 engine of a bf16 source holds the source's bytes on disk; ONNX Runtime
    folds the Casts when it loads the engine (values unchanged: bf16 -> fp32 is exact). Returns the bytes saved.

    Run on a built engine (after the offline pass, whose constant folding would undo it); its external data,
    if any, is rewritten into one file beside it."""
    model = onnx.load(str(path))
    graph, saved, casts = model.graph, 0, []
    for i, tensor in enumerate(graph.initializer):
        if tensor.data_type != onnx.TensorProto.FLOAT or np.prod(tensor.dims, dtype=np.int64) < min_elements:
            continue
        bits = numpy_helper.to_array(tensor).astype(np.float32).view(np.uint32)
        if np.any(bits & 0xFFFF):
            continue
        narrow = onnx.TensorProto(name=f"{tensor.name}.bf16", data_type=onnx.TensorProto.BFLOAT16,
                                  dims=tensor.dims, raw_data=(bits >> 16).astype(np.uint16).tobytes())
        casts.append(helper.make_node("Cast", [narrow.name], [tensor.name], to=onnx.TensorProto.FLOAT,
                                      name=f"{tensor.name}.cast"))
        saved += 2 * int(bits.size)
        graph.initializer[i].CopyFrom(narrow)
    if not casts:
        return 0
    nodes = [*casts, *graph.node]
    del graph.node[:]
    graph.node.extend(nodes)
    external = sorted(external_files(onnx.load(str(path), load_external_data=False)))
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.stem}.", dir=path.parent))
    try:
        tmp = tmpdir / path.name
        if external:
            onnx.save_model(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=external[0], size_threshold=1024)
        else:
            onnx.save_model(model, str(tmp))
        onnx.checker.check_model(str(tmp))
        for old in external:
            (path.parent / old).unlink(missing_ok=True)
        for f in tmpdir.iterdir():
            os.replace(f, path.parent / f.name)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return saved
