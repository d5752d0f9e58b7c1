"""`--backend aoti`: AOTInductor packages per component, checked against PyTorch, run by the Python runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from stdrc.export.specs import component_specs
from stdrc.runtime.backends import open_engine
from stdrc.runtime.backends.torch import TorchEngine
from stdrc.runtime.manifest import read_manifest
from stdrc.runtime.pipeline import Pipeline
from stdrc.runtime.video import psnr
from stdrc.runtime.vocab import COMPONENTS, STAGE_COMPONENTS

pytestmark = pytest.mark.slow  # minutes on 2 CPU cores, almost all of it the shared bundles' AOTInductor compiles

FP32_ATOL = 1e-4
PSNR_MIN_DB = 40.0


@pytest.fixture(scope="session")
def aoti_bundle(aoti_two_stage_bundle: Path) -> Path:
    """tests/conftest.py's two-stage aoti bundle (9x128x64, the DiT's RoPE tables as inputs): one build serves
    these tests and the C++ runner's; the baked-RoPE DiT is tiny23's (test_ltx23_dit_matches_ltx_core)."""
    return aoti_two_stage_bundle


def _batches(dynamic: dict[str, list[int]]) -> list[int | None]:
    if "batch" not in dynamic:
        return [None]
    lo, opt, hi = dynamic["batch"]
    return sorted({lo, opt, hi, (lo + hi) // 2})


def test_manifest_records_aoti_packages(aoti_bundle: Path) -> None:
    manifest = read_manifest(aoti_bundle)
    assert set(manifest.components) == set(COMPONENTS + STAGE_COMPONENTS)
    for name, entry in manifest.components.items():
        assert entry.backend == "aoti", name
        assert entry.file == f"{name}.pt2"
        assert entry.build.torch_version == torch.__version__
    # tokens: the stage-1 half 9x64x32 (4 video + 2 reference) up to the bucket 9x128x64 (16 + 8)
    assert manifest.components["dit"].dynamic_dims == {"batch": [1, 3, 3], "tokens": [6, 24, 24]}


def test_every_component_matches_pytorch(aoti_bundle: Path, tiny_models) -> None:
    """The one-stage components; `dit_refine` has its own test below, the upsampler verify's (against ltx-core)."""
    manifest = read_manifest(aoti_bundle)
    modules = tiny_models.export_modules(manifest.bucket, manifest.rope.layout, rope_input=True)
    specs = component_specs(tiny_models.preset, manifest.bucket, rope_input=True, two_stage=True)
    assert set(COMPONENTS) <= set(modules), "a bundle component has no parity case"
    errors = {}
    for name in COMPONENTS:
        entry = manifest.components[name]
        engine = open_engine(aoti_bundle, name, entry, trust_code=True)
        assert isinstance(engine, TorchEngine)
        for batch in _batches(entry.dynamic_dims):
            feeds = specs[name].sample_inputs(seed=1234, batch=batch)
            got = engine.run(feeds)
            with torch.no_grad():
                want = modules[name](*[torch.from_numpy(feeds[t.name]) for t in specs[name].inputs])
            want = want if isinstance(want, (tuple, list)) else (want,)
            for spec, value in zip(entry.outputs, want):
                assert got[spec.name].shape == tuple(value.shape), (name, batch, spec.name)
                errors[(name, batch, spec.name)] = float(np.abs(got[spec.name] - value.float().numpy()).max())
    bad = {k: v for k, v in errors.items() if v > FP32_ATOL}
    assert not bad, f"aoti vs PyTorch max abs error over {FP32_ATOL}: {bad}"


@pytest.mark.parametrize("stages", [1, 2])
def test_generate_matches_onnxruntime(stages: int, aoti_bundle: Path, two_stage_bundle: Path) -> None:
    """The same two-stage bundle (9x128x64) built for aoti and for ONNX Runtime: one stage, and both."""
    reference = np.random.default_rng(7).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    results = {}
    for label, bundle in (("aoti", aoti_bundle), ("onnxruntime", two_stage_bundle)):
        pipeline = Pipeline.from_bundle(bundle, trust_code=True)
        assert {e.entry.backend for e in pipeline.engines.values()} == {label}
        results[label] = pipeline.generate(reference, prompt="a person waving", seed=5, face_crop=False,
                                           stages=stages)
    aoti, ort = results["aoti"], results["onnxruntime"]
    assert aoti.frames.shape == ort.frames.shape == (9, 64, 128, 3)
    assert np.abs(aoti.latent - ort.latent).max() <= 1e-3
    assert psnr(aoti.frames, ort.frames) >= PSNR_MIN_DB


def test_verify_passes_on_the_aoti_bundle(aoti_bundle: Path) -> None:
    from stdrc.engines.verify import verify_bundle

    reports = verify_bundle(aoti_bundle, trust_code=True)
    assert set(reports) == {"text_gemma", "text_head", "dit", "vae_encoder", "vae_decoder", "face_encoder",
                            "upsampler", "dit_refine"}
    assert all(r.backend == "aoti" and r.ok and r.rel_l2 <= 1e-4 for r in reports.values()), reports


TINY23_TOL = 1e-5  # rel L2, fp32: the DiT parity bound for LTX-2.3


def test_ltx23_dit_matches_ltx_core(aoti_tiny23_bundle: Path) -> None:
    """The aoti package of tiny23's DiT (gated attention, 9-slot + prompt AdaLN, `sigma` input) equals ltx-core's
    own `LTXModel.forward` on the same seeded weights, RoPE from ltx-core's positions, at every batch size; the
    prompt modulation reads the fed sigma, not a token's timestep."""
    from stdrc.export.dit import LtxCoreDiT
    from stdrc.export.models import load_models
    from stdrc.export.reference import token_positions

    manifest = read_manifest(aoti_tiny23_bundle)
    entry, b = manifest.components["dit"], manifest.bucket
    assert entry.backend == "aoti" and entry.inputs[-1].name == "sigma"
    models = load_models("tiny23", components=("dit",))
    ltx_core = LtxCoreDiT(models.dit.ltx).eval()
    positions = token_positions((b.latent_frames, b.latent_height, b.latent_width), manifest.rope.layout, b.fps)
    spec = component_specs(models.preset, b)["dit"]
    engine = open_engine(aoti_tiny23_bundle, "dit", entry, trust_code=True)
    for batch in _batches(entry.dynamic_dims):
        feeds = spec.sample_inputs(seed=1234, batch=batch)
        feeds["timestep"][-1, : b.latent_height * b.latent_width] = 0.0  # a conditioned first frame
        got = engine.run(feeds)["velocity"]
        with torch.no_grad():
            want = ltx_core(positions, **{k: torch.from_numpy(v) for k, v in feeds.items()}).numpy()
        assert got.shape == want.shape
        assert np.linalg.norm(got - want) / np.linalg.norm(want) <= TINY23_TOL, batch
        feeds["sigma"] = feeds["sigma"] * 0.5  # the prompt AdaLN's input: the output follows it
        assert not np.allclose(engine.run(feeds)["velocity"], got, atol=1e-4), batch


# the shared two-stage aoti bundle (tests/conftest.py: seven AOTInductor compiles, ~5 min)
def test_aoti_dit_refine_shares_the_dit_packages_weights(aoti_two_stage_bundle, tiny_models, tmp_path):
    """The aoti `dit_refine` holds kernels, no weights: it names the dit package (same sha256) and the LoRA's
    tensors as its constants, adds at most 1.05x the LoRA's bytes beside its kernel library, and through the
    runtime's engine equals the PyTorch refinement (the DiT with the LoRA's branches) at fp32; a constants file
    that lacks a tensor is one BundleError at load."""
    import copy
    import shutil

    from safetensors.torch import load_file, save_file

    from stdrc.engines.aoti import CONSTANTS_SUFFIX
    from stdrc.engines.refine import random_refine_lora
    from stdrc.export.config import get_preset
    from stdrc.export.refine import add_lora_branches, load_refine_lora
    from stdrc.runtime.errors import BundleError
    from stdrc.runtime.manifest import Bucket, sha256_file

    manifest = read_manifest(aoti_two_stage_bundle)
    dit, refine = manifest.components["dit"], manifest.components["dit_refine"]
    own = f"dit_refine{CONSTANTS_SUFFIX}"
    assert (refine.backend, refine.file, refine.build.constants_from, refine.build.constants_file) == \
        ("aoti", "dit_refine.pt2", "dit.pt2", own)
    assert refine.extra_files == {"dit.pt2": dit.sha256, own: sha256_file(aoti_two_stage_bundle / own)}
    preset = get_preset("tiny")
    lora = load_refine_lora(random_refine_lora(preset, 0, tmp_path), preset.dit)
    assert lora.sha256 == manifest.two_stage.lora.sha256
    assert (aoti_two_stage_bundle / own).stat().st_size <= 1.05 * lora.path.stat().st_size

    feeds = component_specs(preset, Bucket(**{**preset.default_bucket, "width": 128}), rope_input=True,
                            two_stage=True)["dit_refine"].sample_inputs(seed=4, batch=1)
    got = open_engine(aoti_two_stage_bundle, "dit_refine", refine, trust_code=True).run(feeds)["velocity"]
    module = add_lora_branches(copy.deepcopy(tiny_models.dit), lora).eval()
    with torch.no_grad():
        want = module(*[torch.from_numpy(feeds[t.name]) for t in refine.inputs]).numpy()
        base = tiny_models.dit(*[torch.from_numpy(feeds[t.name]) for t in refine.inputs]).numpy()
    assert np.linalg.norm(got - want) / np.linalg.norm(want) <= 1e-5
    assert np.linalg.norm(base - want) / np.linalg.norm(want) > 1e-2  # the LoRA changes the output

    broken = tmp_path / "broken"
    shutil.copytree(aoti_two_stage_bundle, broken)
    tensors = load_file(str(broken / own))
    save_file(dict(list(tensors.items())[1:]), str(broken / own))
    with pytest.raises(BundleError, match=f"in neither dit.pt2 and {own}: rebuild the bundle"):
        open_engine(broken, "dit_refine", refine, trust_code=True)
