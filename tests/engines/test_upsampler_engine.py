"""The `upsampler` bundle component: built by `build_component` (ONNX Runtime; torch through the torch.export
path) from the tiny presets' seeded upsampler or an `--upsampler` file, over two buckets' stage-1 grids, run
through the runtime's engine and compared with ltx-core's LatentUpsampler + upsample_video as `verify` builds
that reference; the manifest entry, sources and memory estimate; the CLI refusal of a file whose channels are
not the VAE's (one line, exit 2, no tensor read)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from safetensors.torch import save_file

from stdrc.engines.build import BuildConfig, build_component
from stdrc.engines.bundle import BundleWriter
from stdrc.engines.preflight import engine_bytes_estimate
from stdrc.engines.verify import _reference, compare
from stdrc.export import checkpoint
from stdrc.export.config import get_preset
from stdrc.export.models import plan_sources
from stdrc.export.specs import component_specs
from stdrc.export.upsampler import TINY_UPSAMPLER, UpsamplerConfig, build_upsampler, save_upsampler
from stdrc.runtime.backends import open_engine
from stdrc.runtime.manifest import Bucket, sha256_file
from stdrc.runtime.memory import activation_bytes, component_weight_bytes
from stdrc.runtime.schema import ModelConfig

BUCKETS = (Bucket(9, 128, 128, 16), Bucket(17, 64, 128, 16))  # stage-1 grids 2x2x2 and 3x1x2
TOL = 1e-5  # rel L2, fp32: tighter than verify's 1e-4


def _build(tmp_path: Path, backend: str, upsampler: Path | None = None) -> tuple[dict, list]:
    """The upsampler engine of a two-stage tiny bundle over BUCKETS; (entry + folder, feeds and outputs per
    bucket, the reference's per bucket)."""
    preset = get_preset("tiny")
    src = plan_sources(preset, upsampler=upsampler, two_stage=True)
    spec = component_specs(src.preset, BUCKETS, rope_input=True, two_stage=True)["upsampler"]
    cfg = BuildConfig(out=tmp_path / "bundle", cache_dir=tmp_path / "cache", backend=backend, progress=False,
                      upsampler=upsampler, two_stage=True)
    with BundleWriter(cfg.out) as writer:
        entry = build_component(cfg, backend, src, BUCKETS[0], spec, writer, full=lambda: None)
        engine = open_engine(writer.staging, "upsampler", entry, trust_code=True)
        checked = []
        for b in BUCKETS:
            one = component_specs(src.preset, b, rope_input=True, two_stage=True)["upsampler"]
            feed = one.sample_inputs(seed=3)
            (want,), _ = _reference(src, "upsampler", None, one, [feed], None, [b])
            checked.append((feed, engine.run(feed)["upsampled"], want[0]))
        sha = sha256_file(writer.path(entry.file))
        size = component_weight_bytes(writer.staging, entry.file, entry.extra_files)
        kept = tmp_path / "engine"
        shutil.copytree(writer.staging, kept)
    return {"entry": entry, "spec": spec, "src": src, "sha256": sha, "bytes": size, "folder": kept}, checked


def _assert_matches(checked: list) -> None:
    for b, (feed, got, want) in zip(BUCKETS, checked):
        h = b.half()
        assert feed["latent"].shape == (1, 128, h.latent_frames, h.latent_height, h.latent_width)
        assert got.shape == want.shape == (1, 128, b.latent_frames, b.latent_height, b.latent_width)
        _, rel = compare(got, want)
        assert rel <= TOL, (b.label(), rel)
        assert not np.allclose(got, feed["latent"].repeat(2, 3).repeat(2, 4), atol=1e-2)  # not a plain resize


def test_seeded_tiny_upsampler_on_onnxruntime(tmp_path: Path) -> None:
    built, checked = _build(tmp_path, "onnxruntime")
    entry, spec = built["entry"], built["spec"]
    assert entry.file == "upsampler.onnx" and entry.precision == "fp32" and entry.sha256 == built["sha256"]
    assert [t.name for t in entry.inputs] == ["latent"] and [t.name for t in entry.outputs] == ["upsampled"]
    assert entry.dynamic_dims == spec.dynamic_dims == {"latent_frames": [2, 2, 3], "latent_height": [1, 2, 2]}
    assert entry.outputs[0].shape == (1, 128, "latent_frames", "latent_height*2", 4)
    assert "seeded" in entry.build.source and "files" not in entry.build.source  # tiny: seeded VAE too
    _assert_matches(checked)
    model = ModelConfig.of_preset(get_preset("tiny"), seed=0)
    assert activation_bytes("upsampler", model, BUCKETS[0], "fp32") == 3 * 512 * 2 * 4 * 4 * 4


def test_upsampler_file_is_recorded_and_matches(tmp_path: Path) -> None:
    """A bf16 file (as released): the fp32 engine keeps its weights as bf16 on disk (about the file's bytes)."""
    path = save_upsampler(tmp_path / "tiny-upscaler-x2.safetensors",
                          build_upsampler(TINY_UPSAMPLER, 9).to(torch.bfloat16), TINY_UPSAMPLER)
    built, checked = _build(tmp_path, "onnxruntime", upsampler=path)
    entry = built["entry"]
    engine = onnx.load(str(built["folder"] / entry.file), load_external_data=False)
    narrowed = [t for t in engine.graph.initializer if t.data_type == onnx.TensorProto.BFLOAT16]
    assert len(narrowed) == 3 + 2 * 2 * TINY_UPSAMPLER.num_blocks_per_stage  # every conv weight
    ratio = built["bytes"] / path.stat().st_size
    assert ratio <= 1.05, ratio
    source = entry.build.source
    estimate = engine_bytes_estimate(built["src"], "onnxruntime", "fp32")  # from the header, before the build
    assert estimate == {"upsampler": 4 * sum(p.numel() for p in build_upsampler(TINY_UPSAMPLER, 0).parameters())}
    assert source["files"]["upsampler"] == {"file": path.name, "sha256": sha256_file(path)}
    assert "seeded" in source  # the tiny VAE's statistics are seeded
    _assert_matches(checked)


@pytest.mark.parametrize("backend", ["torch", pytest.param("aoti", marks=pytest.mark.slow)])
def test_torch_backends_build_through_torch_export(tmp_path: Path, backend: str) -> None:
    """torch.export over the same dynamic dims: a .pt2 the runtime runs (aoti: compiled by AOTInductor,
    25-40 s on the shared 2-core VM)."""
    built, checked = _build(tmp_path, backend)
    assert built["entry"].file == "upsampler.pt2" and built["entry"].backend == backend
    _assert_matches(checked)


def test_tensorrt_plan_holds_one_profile_per_stage1_grid(tmp_path: Path) -> None:
    """What build_component hands TensorRT for the upsampler (plan_for over the same spec): one profile per
    bucket's stage-1 grid, min = opt = max, and the runtime picks each bucket's."""
    from stdrc.engines.tensorrt import plan_for, polygraphy_loaders
    from stdrc.runtime.backends.tensorrt import profile_index

    spec = component_specs(get_preset("tiny"), BUCKETS, rope_input=True, two_stage=True)["upsampler"]
    plan = plan_for("upsampler", spec, "fp16", tmp_path, bucket_dims=spec.bucket_dims)
    assert plan.profiles["latent"] == ((1, 128, 2, 1, 2), (1, 128, 2, 2, 2), (1, 128, 3, 2, 2))
    _, config = polygraphy_loaders(plan)
    assert len(config.profiles) == len(plan.bucket_profiles) == 2
    for i, b in enumerate(BUCKETS):
        h = b.half()
        grid = (1, 128, h.latent_frames, h.latent_height, h.latent_width)
        assert plan.bucket_profiles[i]["latent"] == (grid, grid, grid)
        assert profile_index(plan.describe().bucket_profiles, {"latent": grid}) == i


def test_build_refuses_an_upsampler_whose_channels_are_not_the_vaes(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from stdrc.engines.cli import main

    small = UpsamplerConfig(in_channels=16, mid_channels=32, num_blocks_per_stage=1)
    bad = save_upsampler(tmp_path / "up16.safetensors", build_upsampler(small, 0), small)
    lora = tmp_path / "lora.safetensors"  # any safetensors: the upsampler is refused first
    save_file({}, str(lora), metadata={"config": json.dumps({})})
    monkeypatch.setattr(checkpoint, "_read_tensor", lambda *a: pytest.fail("a tensor was read"))
    out = tmp_path / "bundle"
    rc = main(["build-engines", "--preset", "tiny", "--bucket", "9x128x64", "--upsampler", str(bad),
               "--refine-lora", str(lora), "--backend", "onnxruntime", "--out", str(out),
               "--cache-dir", str(tmp_path / "cache"), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert "upsamples 16-channel latents and the VAE's have 128" in err[0] and "--upsampler" in err[0]
    assert not out.exists()


@pytest.mark.slow  # verify runs every component of the bundle: 17 s (+ the shared fixture, 43 s)
def test_two_stage_bundle_records_and_verifies_its_upsampler(two_stage_bundle: Path) -> None:
    from stdrc.engines.verify import REF_PRESET_CONFIG, verify_bundle
    from stdrc.runtime.manifest import read_manifest

    manifest = read_manifest(two_stage_bundle)
    entry = manifest.components["upsampler"]
    assert entry.inputs[0].shape == (1, 128, 2, 1, 2) and entry.outputs[0].shape == (1, 128, 2, 2, 4)
    size = sum((two_stage_bundle / f).stat().st_size for f in (entry.file, *entry.extra_files))
    assert manifest.memory.weight_bytes["upsampler"] == size > 0
    assert manifest.memory.activation_bytes["upsampler"] == 3 * 512 * 2 * 2 * 4 * 4
    assert manifest.created_by.sources["upsampler"] == entry.build.source
    reports = verify_bundle(two_stage_bundle)
    report = reports["upsampler"]
    assert report.ok and report.rel_l2 <= TOL and report.buckets == ("9x128x64",)
    # seeded: ltx-core's LatentUpsampler and LTXModel (the refinement LoRA fused into it) from the preset's config
    for name in ("upsampler", "dit", "dit_refine"):
        assert reports[name].ok and reports[name].reference == REF_PRESET_CONFIG, (name, reports[name])


@pytest.mark.slow  # a two-stage tiny build (its other components from the shared stage cache) and verify: 32 s alone
def test_verify_needs_the_upsampler_file_the_bundle_was_built_with(tmp_path: Path, cache_dir: Path) -> None:
    from stdrc.engines.build import build_engines
    from stdrc.engines.verify import verify_bundle
    from stdrc.export.errors import CheckpointError
    from stdrc.export.lora import LoraSpec
    from stdrc.export.refine import write_random_lora

    path = save_upsampler(tmp_path / "up.safetensors", build_upsampler(TINY_UPSAMPLER, 9).to(torch.bfloat16),
                          TINY_UPSAMPLER)  # bf16: the engine's weights stored narrowed (store_bf16_weights)
    other = save_upsampler(tmp_path / "other.safetensors", build_upsampler(TINY_UPSAMPLER, 10), TINY_UPSAMPLER)
    lora = LoraSpec(write_random_lora(tmp_path / "refine.safetensors", get_preset("tiny").dit))
    bundle = build_engines(BuildConfig(out=tmp_path / "bundle", cache_dir=cache_dir, backend="onnxruntime",
                                       progress=False, buckets=("9x128x64",), upsampler=path, refine_lora=lora))
    with pytest.raises(CheckpointError, match=r"upsampler was built from upsampler up.safetensors .*--upsampler"):
        verify_bundle(bundle, refine_lora=lora)
    with pytest.raises(CheckpointError, match=r"not upsampler other.safetensors"):
        verify_bundle(bundle, refine_lora=lora, upsampler=other)
    report = verify_bundle(bundle, refine_lora=lora, upsampler=path)["upsampler"]
    assert report.ok and report.rel_l2 <= TOL


@pytest.mark.slow  # the released width: a 252 MB bf16 file exported and built; 14 s, 1.9 GB peak RSS
def test_real_width_engine_adds_about_the_files_bytes(tmp_path: Path) -> None:
    """docs/benchmarks.md's figure: the fp32 ONNX Runtime engine of a released-width bf16 upsampler file is
    within 1.05x of the file's bytes (measured 1.0002x), so a two-stage bundle adds no second copy of it."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    try:
        import synthetic
    finally:
        sys.path.pop(0)
    path = synthetic.write_upsampler(tmp_path / "x2.safetensors")
    src = plan_sources(get_preset("tiny"), upsampler=path, two_stage=True)
    bucket = Bucket(9, 128, 128, 16)
    spec = component_specs(src.preset, bucket, rope_input=True, two_stage=True)["upsampler"]
    cfg = BuildConfig(out=tmp_path / "bundle", cache_dir=tmp_path / "cache", backend="onnxruntime",
                      progress=False, upsampler=path, two_stage=True)
    with BundleWriter(cfg.out) as writer:
        entry = build_component(cfg, "onnxruntime", src, bucket, spec, writer, full=lambda: None)
        ratio = component_weight_bytes(writer.staging, entry.file, entry.extra_files) / path.stat().st_size
    assert 1.0 <= ratio <= 1.05, ratio
