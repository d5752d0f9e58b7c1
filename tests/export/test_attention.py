"""Fused attention in the exported DiT: one op per attention, per backend, with parity to PyTorch."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from ltx_core.model.transformer.attention import Attention, PytorchAttention

from stdrc.export.attention import KeyMaskedAttention, fused_attention
from stdrc.export.config import get_preset
from stdrc.export.dit import BakedRopeDiT, build_dit, key_bias
from stdrc.export.onnx_export import export_onnx
from stdrc.export.reference import token_positions
from stdrc.export.rope import rope_tables
from stdrc.export.specs import component_specs
from stdrc.runtime.manifest import Bucket

BUCKET = Bucket(frames=9, height=64, width=96, text_length=16)
PRESET = get_preset("tiny")
ATTENTIONS_PER_LAYER = 2  # self-attention over video + reference tokens, cross-attention to the text


@pytest.fixture(scope="module")
def module() -> BakedRopeDiT:
    grid = (BUCKET.latent_frames, BUCKET.latent_height, BUCKET.latent_width)
    tables = rope_tables(token_positions(grid, "tass", BUCKET.fps), PRESET.dit)
    return BakedRopeDiT(build_dit(PRESET.dit, seed=0), tables.cos, tables.sin).eval()


@pytest.fixture(scope="module")
def spec():
    return component_specs(PRESET, BUCKET)["dit"]


def masked_feeds(spec, batch: int = 3) -> dict[str, np.ndarray]:
    """Three guidance streams: one with its reference keys off, one with a padded (masked) text."""
    feeds = spec.sample_inputs(seed=7, batch=batch)
    feeds["context_mask"][1, :5] = 0
    return feeds


def torch_velocity(module, spec, feeds) -> np.ndarray:
    with torch.no_grad():
        return module(*[torch.from_numpy(feeds[t.name]) for t in spec.inputs]).numpy()


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b.astype(np.float64)))


def op_counts(path: Path) -> collections.Counter:
    return collections.Counter(f"{n.domain}::{n.op_type}" if n.domain else n.op_type
                               for n in onnx.load(str(path), load_external_data=False).graph.node)


def softmax_between_matmuls(path: Path) -> int:
    """Softmax nodes fed (through Add/Mul/Where) by a MatMul and feeding a MatMul: unfused attention."""
    graph = onnx.load(str(path), load_external_data=False).graph
    producer = {o: n for n in graph.node for o in n.output}
    consumers = collections.defaultdict(list)
    for n in graph.node:
        for i in n.input:
            consumers[i].append(n)

    def from_matmul(name: str, hops: int = 4) -> bool:
        node = producer.get(name)
        while node is not None and hops:
            if node.op_type == "MatMul":
                return True
            if node.op_type not in ("Add", "Mul", "Where", "Div", "Cast"):
                return False
            node, hops = producer.get(node.input[0]), hops - 1
        return False

    return sum(1 for n in graph.node if n.op_type == "Softmax" and from_matmul(n.input[0])
               and any(c.op_type == "MatMul" for c in consumers[n.output[0]]))


def test_key_masked_attention_is_ltx_cores_attention():
    torch.manual_seed(0)
    b, n, heads, dim = 3, 40, 4, 8
    q, k, v = (torch.randn(b, n, heads * dim) for _ in range(3))
    visible = torch.ones(b, n, dtype=torch.int64)
    visible[0, 30:] = 0
    bias = key_bias(visible, torch.float32)
    want = PytorchAttention()(q, k, v, heads, bias)
    assert torch.allclose(KeyMaskedAttention()(q, k, v, heads, bias), want, atol=1e-6)
    assert torch.allclose(KeyMaskedAttention()(q, k, v, heads, None), PytorchAttention()(q, k, v, heads), atol=1e-6)


def test_fused_attention_restores_the_model(module):
    layers = [m for m in module.modules() if isinstance(m, Attention)]
    before = [m.attention_function for m in layers]
    with pytest.raises(RuntimeError), fused_attention(module, "ort") as swapped:
        assert swapped == len(layers) == ATTENTIONS_PER_LAYER * PRESET.dit.num_layers
        assert all(isinstance(m.attention_function, KeyMaskedAttention) for m in layers)
        raise RuntimeError("export failed")
    assert [m.attention_function for m in layers] == before
    with pytest.raises(ValueError, match="choose one of"), fused_attention(module, "flash"):
        pass


def test_onnxruntime_graph_has_one_fused_op_per_attention_and_matches(module, spec, tmp_path):
    path = export_onnx(module, spec, tmp_path / "dit.onnx", attention="ort")
    counts = op_counts(path)
    assert counts["com.microsoft::MultiHeadAttention"] == ATTENTIONS_PER_LAYER * PRESET.dit.num_layers
    assert counts["Softmax"] == 0 and softmax_between_matmuls(path) == 0
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        feeds = masked_feeds(spec, batch) if batch == 3 else spec.sample_inputs(seed=1, batch=1)
        got = session.run(None, feeds)[0]
        assert rel_l2(got, torch_velocity(module, spec, feeds)) <= 1e-5


@pytest.mark.slow  # onnx's reference evaluator
def test_tensorrt_graph_uses_onnx_attention_and_matches(module, spec, tmp_path):
    """TensorRT's parser takes ONNX `Attention` (10.14+), no com.microsoft op; ORT CPU refuses its key
    bias, so onnx's own reference evaluator checks the numbers."""
    from onnx.reference import ReferenceEvaluator

    path = export_onnx(module, spec, tmp_path / "dit_trt.onnx", attention="onnx")
    model = onnx.load(str(path))
    counts = op_counts(path)
    assert counts["Attention"] == ATTENTIONS_PER_LAYER * PRESET.dit.num_layers
    assert counts["Softmax"] == 0 and not any("microsoft" in k for k in counts)
    assert {o.domain: o.version for o in model.opset_import}[""] >= 23
    feeds = masked_feeds(spec)
    got = ReferenceEvaluator(model).run(None, feeds)[0]
    assert rel_l2(got, torch_velocity(module, spec, feeds)) <= 1e-5


@pytest.mark.slow  # a second export
def test_unfused_baseline_is_what_the_graph_check_catches(module, spec, tmp_path):
    path = export_onnx(module, spec, tmp_path / "dit_unfused.onnx", attention="unfused")
    assert softmax_between_matmuls(path) == ATTENTIONS_PER_LAYER * PRESET.dit.num_layers


def test_bundle_dit_is_fused(tiny_bundle):
    assert softmax_between_matmuls(tiny_bundle / "dit.onnx") == 0
    assert op_counts(tiny_bundle / "dit.onnx")["com.microsoft::MultiHeadAttention"] > 0
