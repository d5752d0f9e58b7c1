"""ONNX Runtime engines: fp32 optimised offline for CPU; fp16 for the CUDA EP, optimised by it at load.

The CPU-side offline pass must not touch an fp16 graph: the CPU EP lacks fp16 kernels for most
ops and wraps each in Casts back to float, so the saved "fp16" engine would compute in fp32.
fp16 graphs are converted from the exported fp32 graph with RMS norms fused first into
`SimplifiedLayerNormalization` (statistics in fp32, whatever the input type), then saved as they are.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from stdrc.export.errors import ExportError

log = logging.getLogger(__name__)
PRECISIONS = ("fp32", "fp16")


def uses_external_data(path: Path) -> bool:
    model = onnx.load(str(path), load_external_data=False)
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


RMS_NORM_CHAIN = ("Pow", "ReduceMean", "Add", "Sqrt", "Reciprocal", "Mul")  # x * rsqrt(mean(x^2) + eps)


def _fuse_plain_rms_norms(model: onnx.ModelProto) -> int:
    """RMS norms without a weight (ORT's fusion needs one) -> SimplifiedLayerNormalization with a ones scale."""
    graph = model.graph
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    consts.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node
                   if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"})
    shapes = {v.name: v.type.tensor_type.shape.dim for v in [*graph.value_info, *graph.input]}
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
        dims = shapes.get(x)
        if (len(chain) < len(RMS_NORM_CHAIN) or set(chain[-1].input) != {x, chain[-2].output[0]}
                or not dims or not dims[-1].dim_value or float(consts.get(pow_node.input[1], 0)) != 2.0):
            continue
        eps = next((consts[i] for i in chain[2].input if i in consts), None)
        if eps is None or eps.size != 1:
            continue
        scale = numpy_helper.from_array(np.ones(dims[-1].dim_value, np.float32), f"{chain[-1].name}_ones_scale")
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


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """fp16 compute with fp32 graph inputs/outputs and RMS-norm statistics in fp32 (fused norms)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.fusion_simplified_layernorm import FusionSimplifiedLayerNormalization
    from onnxruntime.transformers.onnx_model import OnnxModel

    wrapped = OnnxModel(model)
    FusionSimplifiedLayerNormalization(wrapped).apply()  # norms with a weight
    wrapped.prune_graph()
    _fuse_plain_rms_norms(wrapped.model)
    if not any(o.domain == "com.microsoft" for o in wrapped.model.opset_import):
        wrapped.model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    half = OnnxModel(convert_float_to_float16(wrapped.model, keep_io_types=True))
    half.topological_sort()  # the converter appends its input/output casts at the end
    return half.model


def build_ort_engine(onnx_path: Path, out_path: Path, precision: str = "fp32") -> dict:
    """Optimise `onnx_path` (ORT 'extended' level: portable across CPUs) and save it at `out_path`."""
    if precision not in PRECISIONS:
        raise ExportError(f"ONNX Runtime engines are {' or '.join(PRECISIONS)}, not {precision}: "
                          "use --precision fp32 (CPU) or fp16 (CUDA EP); FP8 needs --backend tensorrt")
    fd, tmp = tempfile.mkstemp(prefix=f".{out_path.stem}.", suffix=".onnx", dir=out_path.parent)
    os.close(fd)
    try:
        if precision == "fp16":  # no CPU-side pass: the CUDA EP optimises the fp16 graph at load
            model = to_fp16(onnx.load(str(onnx_path)))
            external = uses_external_data(onnx_path)
            onnx.save(model, tmp, save_as_external_data=external, location=out_path.name + ".data")
            check = ort.SessionOptions()  # ORT, not onnx.checker: SimplifiedLayerNormalization is ORT's own op
            check.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            check.log_severity_level = 3
            ort.InferenceSession(tmp, check, providers=["CPUExecutionProvider"])
            os.chmod(tmp, 0o644)
            os.replace(tmp, out_path)
            return {"onnxruntime_version": ort.__version__, "graph_optimization_level": "at load (target provider)"}
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
        raise ExportError(f"ONNX Runtime could not optimise {onnx_path.name}: {str(e).splitlines()[0]}") from e
    finally:
        Path(tmp).unlink(missing_ok=True)
    return {"onnxruntime_version": ort.__version__, "graph_optimization_level": "extended"}
