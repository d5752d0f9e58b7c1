"""The LTX-2.3 DiT path at tiny width (`tiny23`): every exported form takes the stream's `sigma` and equals
ltx-core; the runtime feeds `sigma` and generates what PyTorch's sampling gives.

tests/export/test_dit_ltx23.py holds the real-width parity; here the cheap checks that need many graphs.
"""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from ltx_core.guidance.perturbations import BatchedPerturbationConfig
from ltx_core.model.transformer.modality import Modality

from stdrc.export.config import get_preset
from stdrc.export.dit import BakedRopeDiT, build_dit, dit_input_names
from stdrc.export.onnx_export import export_onnx
from stdrc.export.reference import token_positions
from stdrc.export.rope import rope_tables
from stdrc.export.specs import component_specs
from stdrc.runtime.manifest import Bucket

PRESET = get_preset("tiny23")
BUCKET = Bucket(**PRESET.default_bucket)
GRID = (BUCKET.latent_frames, BUCKET.latent_height, BUCKET.latent_width)
TOL = 1e-5


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def positions() -> torch.Tensor:
    return token_positions(GRID, "tass", BUCKET.fps)


@pytest.fixture(scope="module")
def module(positions: torch.Tensor) -> BakedRopeDiT:
    tables = rope_tables(positions, PRESET.dit)
    return BakedRopeDiT(build_dit(PRESET.dit, seed=2), tables.cos, tables.sin).eval()


@pytest.fixture(scope="module")
def spec():
    return component_specs(PRESET, BUCKET)["dit"]


def feeds(spec, batch: int = 3) -> dict[str, np.ndarray]:
    """The spec's sample with the first latent frame conditioned (timestep 0) in the last stream."""
    f = spec.sample_inputs(seed=3, batch=batch)
    f["timestep"][-1, :GRID[1] * GRID[2]] = 0.0
    f["context_mask"][0, :4] = 0
    return f


def ltx_core(module: BakedRopeDiT, f: dict[str, np.ndarray], positions: torch.Tensor) -> np.ndarray:
    x = {k: torch.from_numpy(v) for k, v in f.items()}
    b, n = x["latent"].shape[:2]
    dense = x["attn_mask"][:, None, :].expand(-1, n, -1).float()  # ltx-core's (B, T, T) self-attention mask
    video = Modality(latent=x["latent"], sigma=x["sigma"], timesteps=x["timestep"],
                     positions=positions.expand(b, -1, -1, -1), context=x["context"],
                     context_mask=x["context_mask"], attention_mask=dense)
    with torch.no_grad():
        out, _ = module.dit.ltx(video=video, audio=None, perturbations=BatchedPerturbationConfig.empty(b))
    return out.numpy()


def run_torch(module, spec, f) -> np.ndarray:
    with torch.no_grad():
        return module(*[torch.from_numpy(f[t.name]) for t in spec.inputs]).numpy()


def test_spec_takes_sigma_and_a_context_as_wide_as_the_model(spec) -> None:
    names = [t.name for t in spec.inputs]
    assert names == list(dit_input_names(PRESET.dit)) == [*names[:5], "sigma"]
    assert dict((t.name, t.shape) for t in spec.inputs)["context"][-1] == PRESET.dit.inner_dim
    assert "sigma" not in [t.name for t in component_specs(get_preset("tiny"), BUCKET)["dit"].inputs]
    with_rope = component_specs(PRESET, BUCKET, rope_input=True)["dit"]
    assert [t.name for t in with_rope.inputs] == list(dit_input_names(PRESET.dit, rope_input=True))
    assert [t.name for t in with_rope.inputs][-3:] == ["rope_cos", "rope_sin", "sigma"]


def test_pytorch_matches_ltx_core_and_needs_sigma(module, spec, positions) -> None:
    f = feeds(spec)
    assert rel_l2(run_torch(module, spec, f), ltx_core(module, f, positions)) <= TOL
    with pytest.raises(ValueError, match="pass the stream's sigma"):
        module(*[torch.from_numpy(f[t.name]) for t in spec.inputs][:5])


@pytest.mark.slow  # two exports, one run by onnx's reference evaluator
@pytest.mark.parametrize("kind", ["ort", "onnx"])
def test_exported_graph_matches_ltx_core(kind: str, module, spec, positions,
                                         tmp_path: Path) -> None:
    """`ort`: com.microsoft MultiHeadAttention, run by ONNX Runtime; `onnx`: ONNX Attention for TensorRT,
    run by onnx's reference evaluator (ORT's CPU kernel refuses its key bias). Gates sit beside the fused op."""
    path = export_onnx(module, spec, tmp_path / "dit.onnx", attention=kind)
    model = onnx.load(str(path))
    ops = collections.Counter(n.op_type for n in model.graph.node)
    attentions = 2 * PRESET.dit.num_layers
    assert ops["MultiHeadAttention" if kind == "ort" else "Attention"] == attentions and ops["Softmax"] == 0
    assert ops["Sigmoid"] >= attentions
    assert [i.name for i in model.graph.input] == [t.name for t in spec.inputs]
    for batch in (1, 3):
        f = feeds(spec, batch)
        if kind == "ort":
            got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, f)[0]
        else:
            from onnx.reference import ReferenceEvaluator

            got = ReferenceEvaluator(model).run(None, f)[0]
        assert rel_l2(got, ltx_core(module, f, positions)) <= TOL, batch
