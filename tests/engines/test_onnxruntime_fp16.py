"""The fp16 ONNX Runtime engine computes in fp16: op dtypes in the saved graph, and it still runs under ORT CPU."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest

from stdrc.engines.onnxruntime import build_ort_engine
from stdrc.export.onnx_export import export_onnx
from stdrc.export.specs import component_specs

FLOAT16 = onnx.TensorProto.FLOAT16


@pytest.fixture(scope="module")
def dit_onnx(tiny_models, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    from stdrc.engines.build import BuildConfig
    from stdrc.engines.preflight import check_bucket

    bucket, _ = check_bucket(BuildConfig())
    spec = component_specs(tiny_models.preset, bucket)["dit"]
    module = tiny_models.export_modules(bucket, "tass")["dit"]
    return export_onnx(module, spec, tmp_path_factory.mktemp("fp16") / "dit_src.onnx"), spec


def _input_types(model: onnx.ModelProto) -> dict[str, int]:
    """Every value's element type: value_info, graph inputs/outputs, initializers and Constant nodes."""
    graph = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
    types.update({t.name: t.data_type for t in graph.initializer})
    types.update({n.output[0]: n.attribute[0].t.data_type for n in graph.node if n.op_type == "Constant"})
    return types


def test_fp16_graph_is_fp16(dit_onnx, tmp_path: Path) -> None:
    src, _ = dit_onnx
    out = tmp_path / "dit.onnx"
    build_ort_engine(src, out, "fp16")
    model = onnx.load(str(out))
    types = _input_types(model)  # as declared: ORT checks them against its own type inference at load
    ops = Counter(n.op_type for n in model.graph.node)
    gemms = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm")]
    assert gemms and all(types.get(i) == FLOAT16 for n in gemms for i in n.input if i), "a GEMM runs in fp32"
    adds = [n for n in model.graph.node if n.op_type == "Add"]
    assert sum(types.get(n.input[0]) == FLOAT16 for n in adds) >= 0.9 * len(adds)
    # the fp32 graph's norms are fused: statistics in fp32 inside SimplifiedLayerNormalization, no Pow/ReduceMean
    src_ops = Counter(n.op_type for n in onnx.load(str(src)).graph.node)
    assert ops["SimplifiedLayerNormalization"] == src_ops["ReduceMean"] > 0 and ops["ReduceMean"] == 0
    assert ops["Cast"] <= src_ops["Cast"] + 2 * len(model.graph.input) + 2, ops["Cast"]  # io casts only


def test_fp16_engine_runs_on_ort_cpu_close_to_fp32(dit_onnx, tmp_path: Path) -> None:
    """ORT CPU lacks fp16 kernels for some ops and casts around them at load: it still runs, and agrees."""
    import onnxruntime as ort

    src, spec = dit_onnx
    build_ort_engine(src, tmp_path / "dit16.onnx", "fp16")
    build_ort_engine(src, tmp_path / "dit32.onnx", "fp32")
    feeds = spec.sample_inputs(seed=3, batch=3)
    runs = [ort.InferenceSession(str(tmp_path / f), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
            for f in ("dit16.onnx", "dit32.onnx")]
    half, full = runs
    assert half.dtype == np.float32 and half.shape == full.shape
    cos = float((half * full).sum() / (np.linalg.norm(half) * np.linalg.norm(full)))
    assert cos >= 0.999, cos
    assert not np.array_equal(half, full)  # really computed at lower precision
