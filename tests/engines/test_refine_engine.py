"""The ONNX Runtime refinement engine (engines/refine.py): the `dit` engine's graph plus LoRA branches, its base
weights read from the `dit` component's own data file (same bytes, same offsets), the LoRA's A/B beside it."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from stdrc.engines.refine import build_refine_graph, externalize
from stdrc.export.errors import ExportError
from stdrc.export.lora import LoraSpec, dit_shapes
from stdrc.export.refine import add_lora_branches, load_refine_lora, write_random_lora
from stdrc.export.specs import component_specs
from stdrc.runtime.manifest import read_manifest

TOL = 1e-5  # rel L2, fp32 (measured ~1e-6: ORT's fused kernels vs PyTorch)
BRANCH_GRAPH_BYTES = 600  # one branch in the graph file: 6 nodes, 2 external-data records, a scalar (measured 486)


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def external(path) -> dict[str, dict[str, str]]:
    model = onnx.load(str(path), load_external_data=False)
    return {t.name: {e.key: e.value for e in t.external_data} for t in model.graph.initializer
            if t.data_location == onnx.TensorProto.EXTERNAL}


@pytest.fixture(scope="module")
def engines(tiny_bundle, tiny_models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("refine")
    shutil.copy(tiny_bundle / "dit.onnx", folder / "dit.onnx")
    assert externalize(folder / "dit.onnx") == [folder / "dit.onnx.data"]
    lora_path = write_random_lora(folder / "refine.safetensors", tiny_models.preset.dit, seed=3)
    lora = load_refine_lora(LoraSpec(lora_path, 0.75), tiny_models.preset.dit)
    shapes = dit_shapes(tiny_models.preset.dit)
    extra = build_refine_graph(folder / "dit.onnx", folder / "dit_refine.onnx", lora, shapes)
    return folder, lora, extra


def test_base_weights_are_the_dit_files_bytes_and_the_bundle_grows_by_the_lora(engines):
    folder, lora, extra = engines
    assert extra == [folder / "dit_refine.onnx.data"]
    base, refine = external(folder / "dit.onnx"), external(folder / "dit_refine.onnx")
    assert base and all(refine[name] == where for name, where in base.items())  # same file, offsets, lengths
    own = {name for name, where in refine.items() if where["location"] != "dit.onnx.data"}
    assert own == {n for n in refine if n not in base} and len(own) == 2 * len(lora.pairs)
    assert {refine[n]["location"] for n in own} == {"dit_refine.onnx.data"}
    data = extra[0].stat().st_size
    tensors = sum(int(refine[n]["length"]) for n in own)
    assert tensors <= data <= 1.05 * lora.path.stat().st_size  # the A/B bytes in the LoRA's dtype (bf16)
    # the graph file: the dit graph (weightless) plus the branches' nodes, no weight copied into it
    graph = (folder / "dit_refine.onnx").stat().st_size
    assert graph <= (folder / "dit.onnx").stat().st_size + BRANCH_GRAPH_BYTES * len(lora.pairs)


def test_onnx_runtime_equals_the_pytorch_refinement(engines, tiny_bundle):
    from stdrc.export.dit import BakedRopeDiT
    from stdrc.export.models import load_models

    folder, lora, _ = engines
    manifest = read_manifest(tiny_bundle)
    models = load_models("tiny", components=("dit",))  # the bundle's seeded DiT
    spec = component_specs(models.preset, manifest.bucket)["dit"]
    base = models.export_modules(manifest.bucket)["dit"]
    with torch.no_grad():
        plain_dit = load_models("tiny", components=("dit",)).dit
        refine = BakedRopeDiT(add_lora_branches(plain_dit, lora), base.rope_cos, base.rope_sin).eval()
    session = ort.InferenceSession(str(folder / "dit_refine.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        feeds = spec.sample_inputs(seed=4, batch=batch)
        args = [torch.from_numpy(feeds[t.name]) for t in spec.inputs]
        with torch.no_grad():
            plain, want = base(*args).numpy(), refine(*args).numpy()
        got = session.run(None, {t.name: feeds[t.name] for t in spec.inputs})[0]
        assert rel_l2(got, plain) > 1e-2, batch  # the branches are there
        assert rel_l2(got, want) <= TOL, batch


def test_a_target_the_graph_does_not_compute_is_refused(engines, tmp_path):
    """A target whose weight shape is not the one the graph computes: one ExportError, nothing written."""
    from stdrc.export.config import get_preset

    folder, lora, _ = engines
    shapes = {k: v[::-1] if k in lora.pairs else v for k, v in dit_shapes(get_preset("tiny").dit).items()}
    with pytest.raises(ExportError, match="places computing"):
        build_refine_graph(folder / "dit.onnx", tmp_path / "dit_refine.onnx", lora, shapes)
    assert not any(tmp_path.iterdir())
