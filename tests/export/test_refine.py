"""The refinement DiT (export/refine.py): LoRA branches on the base DiT == ltx-core's LTXModel with the LoRA
fused by ltx-core's own `apply_loras`, fp32, on `tiny` and `tiny23`, in PyTorch and in ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from ltx_core.guidance.perturbations import BatchedPerturbationConfig
from ltx_core.loader import LoraStateDictWithStrength, SafetensorsStateDictLoader, SDOps, StateDict, apply_loras
from ltx_core.model.transformer.modality import Modality

from stdrc.export.config import get_preset
from stdrc.export.dit import BakedRopeDiT, build_dit, build_ltx_model
from stdrc.export.errors import LoraError
from stdrc.export.lora import LoraSpec
from stdrc.export.onnx_export import export_onnx
from stdrc.export.reference import token_positions
from stdrc.export.refine import COMFY_PREFIX, LoraLinear, add_lora_branches, load_refine_lora, write_random_lora
from stdrc.export.rope import rope_tables
from stdrc.export.specs import component_specs
from stdrc.runtime.manifest import Bucket

TOL = 1e-5  # rel L2, fp32
STRENGTH = 0.8


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def bf16_dit(preset):
    """A seeded DiT whose weights are bf16 values (as LTX files ship): ltx-core's fusion takes bf16 weights."""
    dit = build_dit(preset.dit, seed=5)
    with torch.no_grad():
        for tensor in dit.ltx.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(tensor.to(torch.bfloat16).float())
    return dit


def run_ltx_core(ltx, f: dict[str, np.ndarray], positions: torch.Tensor) -> np.ndarray:
    x = {k: torch.from_numpy(v) for k, v in f.items()}
    b, n = x["latent"].shape[:2]
    dense = x["attn_mask"][:, None, :].expand(-1, n, -1).float()  # ltx-core's (B, T, T) self-attention mask
    video = Modality(latent=x["latent"], sigma=x["timestep"][:, 0], timesteps=x["timestep"],
                     positions=positions.expand(b, -1, -1, -1), context=x["context"],
                     context_mask=x["context_mask"], attention_mask=dense)
    with torch.no_grad():
        out, _ = ltx(video=video, audio=None, perturbations=BatchedPerturbationConfig.empty(b))
    return out.numpy()


@pytest.fixture(scope="module", params=["tiny", "tiny23"])
def case(request, tmp_path_factory):
    """(preset, bucket, positions, spec, base BakedRopeDiT, refine BakedRopeDiT, ltx-core fused LTXModel, LoRA path)."""
    preset = get_preset(request.param)
    bucket = Bucket(**preset.default_bucket)
    positions = token_positions((bucket.latent_frames, bucket.latent_height, bucket.latent_width), "tass", bucket.fps)
    tables = rope_tables(positions, preset.dit)
    # fp32 storage of bf16 values: ltx-core multiplies a bf16 file's factors in bf16 (1e-3 off exact)
    path = write_random_lora(tmp_path_factory.mktemp("lora") / "refine.safetensors", preset.dit, seed=7,
                             dtype=torch.float32)
    lora = load_refine_lora(LoraSpec(path, STRENGTH), preset.dit)
    base = BakedRopeDiT(bf16_dit(preset), tables.cos, tables.sin).eval()
    refine = BakedRopeDiT(add_lora_branches(bf16_dit(preset), lora), tables.cos, tables.sin).eval()
    ops = SDOps("comfy").with_matching().with_replacement(COMFY_PREFIX, "")
    lsd = SafetensorsStateDictLoader().load(str(path), sd_ops=ops)
    weights = {k: v.to(torch.bfloat16) for k, v in base.dit.ltx.state_dict().items()}
    fused = apply_loras(StateDict(weights, torch.device("cpu"), 0, {torch.bfloat16}),
                        [LoraStateDictWithStrength(lsd, STRENGTH)], dtype=torch.float32).sd
    ltx = build_ltx_model(preset.dit)
    ltx.load_state_dict(fused, strict=True)
    spec = component_specs(preset, bucket)["dit"]
    return preset, positions, spec, base, refine, ltx.eval(), lora


def feeds(spec, batch: int = 3) -> dict[str, np.ndarray]:
    return spec.sample_inputs(seed=11, batch=batch)


def run_torch(module, spec, f) -> np.ndarray:
    with torch.no_grad():
        return module(*[torch.from_numpy(f[t.name]) for t in spec.inputs]).numpy()


def test_branches_keep_the_base_weights_and_names(case):
    preset, _, _, base, refine, _, lora = case
    base_sd, refine_sd = base.state_dict(), refine.state_dict()
    assert set(base_sd) < set(refine_sd)
    assert all(torch.equal(base_sd[k], refine_sd[k]) for k in base_sd)  # W and b: the same names, the same values
    extra = set(refine_sd) - set(base_sd)
    assert extra == {f"dit.ltx.{k[:-len('weight')]}{ab}" for k in lora.pairs for ab in ("lora_A", "lora_B")}
    branches = [m for m in refine.modules() if isinstance(m, LoraLinear)]
    assert len(branches) == len(lora.pairs) > 2 * preset.dit.num_layers  # every Linear: attention, FF, AdaLN


def test_pytorch_equals_ltx_core_fused(case):
    """Branches (W x + B (s A x)) vs ltx-core's fused weights (W + (B s) @ A): one arithmetic, other order."""
    _, positions, spec, base, refine, ltx, _ = case
    f = feeds(spec)
    reference = run_ltx_core(ltx, f, positions)
    ours = run_torch(refine, spec, f)
    assert ours.shape == reference.shape
    assert rel_l2(ours, reference) <= TOL
    assert rel_l2(run_torch(base, spec, f), reference) > 1e-3  # the LoRA really changes the output


@pytest.mark.slow  # a DiT export (30 s); tiny's refinement runs in ORT as a bundle engine (tests/engines)
@pytest.mark.parametrize("case", ["tiny23"], indirect=True)  # the exported graph: sigma input, gates, prompt AdaLN
def test_onnx_runtime_equals_ltx_core_fused(case, tmp_path):
    _, positions, spec, _, refine, ltx, _ = case
    path = export_onnx(refine, spec, tmp_path / "dit_refine.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        f = feeds(spec, batch)
        got = session.run(None, f)[0]
        assert rel_l2(got, run_ltx_core(ltx, f, positions)) <= TOL, batch


def test_lora_of_the_other_family_is_refused(tmp_path):
    """An LTX-2 refinement LoRA on an LTX-2.3 DiT and the reverse: one LoraError from the headers."""
    for made, other in (("tiny", "tiny23"), ("tiny23", "tiny")):
        path = write_random_lora(tmp_path / f"{made}.safetensors", get_preset(made).dit)
        load_refine_lora(LoraSpec(path, 1.0), get_preset(made).dit)
        with pytest.raises(LoraError, match="pass a LoRA for this checkpoint|another model"):
            load_refine_lora(LoraSpec(path, 1.0), get_preset(other).dit)
