"""The TensorRT side of `dit_refine` (engines/refine.py, engines/tensorrt.py): weight-stripped plans refit at load
from ONNX files that share one weights file. TensorRT is not installable here: the plan data, the polygraphy
config and the refit ONNX graph (run by onnx's reference evaluator) are checked; the build runs on a GPU machine."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from stdrc.engines.refine import build_refine_graph, stage_refit_onnx
from stdrc.engines.tensorrt import WEIGHT_STRIPPED_FLAGS, engine_cache_key, plan_for, polygraphy_loaders
from stdrc.export.config import get_preset
from stdrc.export.dit import build_dit
from stdrc.export.lora import LoraSpec, dit_shapes
from stdrc.export.onnx_export import export_onnx
from stdrc.export.refine import add_lora_branches, load_refine_lora, write_random_lora
from stdrc.export.specs import component_specs
from stdrc.runtime.backends.tensorrt import WEIGHTLESS_FLAG, refit_onnx
from stdrc.runtime.errors import BundleError
from stdrc.runtime.manifest import Bucket, ComponentEntry
from stdrc.runtime.schema import BuildFacts

PRESET = get_preset("tiny")
BUCKET = Bucket(**{**PRESET.default_bucket, "width": 128})  # a two-stage size


@pytest.fixture(scope="module")
def specs():
    return component_specs(PRESET, BUCKET, rope_input=True, two_stage=True)


def test_weight_stripped_plans_are_refittable_and_stripped(specs, tmp_path):
    plain = plan_for("dit", specs["dit"], "fp16", tmp_path)
    stripped = plan_for("dit", specs["dit"], "fp16", tmp_path, weight_stripped=True)
    refine = plan_for("dit_refine", specs["dit_refine"], "fp16", tmp_path, weight_stripped=True,
                      onnx_path=tmp_path / "dit_refine.onnx", bucket_dims=specs["dit_refine"].bucket_dims)
    assert plain.builder_flags == ("FP16",) and WEIGHTLESS_FLAG in WEIGHT_STRIPPED_FLAGS
    assert stripped.builder_flags == refine.builder_flags == ("FP16", "REFIT", "STRIP_PLAN")
    assert stripped.describe().builder_flags == ("FP16", "REFIT", "STRIP_PLAN")
    assert engine_cache_key("0" * 64, plain, "10.0", "8.9") != engine_cache_key("0" * 64, stripped, "10.0", "8.9")
    for plan, want in ((plain, False), (stripped, True), (refine, True)):
        _, config = polygraphy_loaders(plan)
        assert config.refittable is want and config.strip_plan is want and config.fp16
    assert refine.plan_path.name == "dit_refine.plan" and refine.onnx_path.name == "dit_refine.onnx"


def test_runtime_finds_the_refit_onnx_or_refuses(tmp_path):
    spec = component_specs(PRESET, BUCKET)["dit"]
    facts = BuildFacts(builder_flags=("FP16", "REFIT", "STRIP_PLAN"))
    entry = ComponentEntry("tensorrt", "dit_refine.plan", "0" * 64, "fp16", spec.inputs, spec.outputs,
                           extra_files={"dit_refine.onnx": "1" * 64, "dit.onnx.data": "2" * 64}, build=facts)
    assert refit_onnx(tmp_path / "dit_refine.plan", entry) == tmp_path / "dit_refine.onnx"
    lacking = ComponentEntry("tensorrt", "dit.plan", "0" * 64, "fp16", spec.inputs, spec.outputs,
                             extra_files={"dit.onnx.data": "2" * 64}, build=facts)
    with pytest.raises(BundleError, match="lists no dit.onnx to refit"):
        refit_onnx(tmp_path / "dit.plan", lacking)


@pytest.mark.slow  # a DiT export for TensorRT (30 s) and a reference-evaluator run
def test_refit_onnx_pair_shares_weights_and_computes_the_refinement(specs, tmp_path):
    """The exported TensorRT DiT (ONNX Attention, RoPE inputs) placed as dit.onnx + dit.onnx.data; dit_refine.onnx
    built on it reads the same records; onnx's reference evaluator runs it equal to the PyTorch refinement."""
    export = tmp_path / "export"
    export.mkdir()
    staging = tmp_path / "staging"
    staging.mkdir()
    dit = build_dit(PRESET.dit, seed=0).eval()
    export_onnx(dit, specs["dit"], export / "dit.onnx", attention="onnx")
    refit = stage_refit_onnx(export / "dit.onnx", staging)
    assert refit == staging / "dit.onnx" and (staging / "dit.onnx.data").is_file()
    lora = load_refine_lora(LoraSpec(write_random_lora(tmp_path / "r.safetensors", PRESET.dit), 0.6), PRESET.dit)
    (own,) = build_refine_graph(refit, staging / "dit_refine.onnx", lora, dit_shapes(PRESET.dit))
    assert own.name == "dit_refine.onnx.data"
    model = onnx.load(str(staging / "dit_refine.onnx"))
    from onnx.reference import ReferenceEvaluator

    feeds = specs["dit_refine"].sample_inputs(seed=5, batch=1)
    got = ReferenceEvaluator(model).run(None, feeds)[0]
    with torch.no_grad():
        want = add_lora_branches(dit, lora)(*[torch.from_numpy(feeds[t.name]) for t in specs["dit"].inputs]).numpy()
    assert np.linalg.norm(got - want) / np.linalg.norm(want) <= 1e-5
