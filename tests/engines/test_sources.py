"""Every component of a bundle comes from recorded sources; the cache and `verify` follow them.

A DiT-only ST-DRC file gets its VAE from `--base-checkpoint` (never a seeded one), the manifest
names each component's file and sha256, and `verify` rebuilds from those same files, refusing
others. Real ArcFace weights are keyed in the ONNX cache: a bundle built with them after a
seeded build (same cache) holds them, and verifies only when given them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from stdrc.engines.build import BuildConfig, build_engines, cache_key
from stdrc.engines.cli import main
from stdrc.engines.preflight import check_bucket
from stdrc.engines.verify import verify_bundle
from stdrc.export import face
from stdrc.export.checkpoint import save_checkpoint
from stdrc.export.config import get_preset
from stdrc.export.dit import build_dit
from stdrc.export.errors import CheckpointError
from stdrc.export.models import plan_sources
from stdrc.export.specs import component_specs
from stdrc.export.vae import build_vae
from stdrc.runtime.manifest import read_manifest, sha256_file

pytestmark = pytest.mark.slow  # one tiny bundle build (~40 s on 2 cores) after the shared seeded one


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("sources")
    preset = get_preset("tiny")
    dit_only, base = folder / "stdrc_dit.safetensors", folder / "ltx2.safetensors"
    save_checkpoint(dit_only, build_dit(preset.dit, seed=21).ltx, layout="ltx")
    enc, dec = build_vae(preset.vae, seed=22)
    save_checkpoint(base, build_dit(preset.dit, seed=23).ltx, enc, dec)
    arc, other = folder / "backbone.pth", folder / "other_backbone.pth"
    torch.save(face.build_face_encoder("tiny", seed=31).state_dict(), arc)
    torch.save(face.build_face_encoder("tiny", seed=32).state_dict(), other)
    return {"dit": dit_only, "base": base, "face": arc, "other_face": other, "folder": folder}


@pytest.fixture(scope="module")
def real_bundle(files: dict[str, Path], tiny_bundle: Path, cache_dir: Path) -> Path:
    """Built after the seeded tiny bundle, in the same stage cache."""
    cfg = BuildConfig(checkpoint=files["dit"], base_checkpoint=files["base"], face_weights=files["face"],
                      out=files["folder"] / "bundle", cache_dir=cache_dir, backend="onnxruntime", progress=False)
    return build_engines(cfg)


def test_manifest_records_every_components_source(real_bundle: Path, files: dict[str, Path]) -> None:
    sources = read_manifest(real_bundle).created_by.sources
    sha = {k: sha256_file(files[k]) for k in ("dit", "base", "face")}
    assert sources["dit"] == {"files": {"dit": {"file": files["dit"].name, "sha256": sha["dit"]}}}
    for name in ("vae_encoder", "vae_decoder"):
        assert sources[name] == {"files": {"vae": {"file": files["base"].name, "sha256": sha["base"]}}}
    assert sources["face_encoder"] == {"files": {"face": {"file": files["face"].name, "sha256": sha["face"]}}}
    assert "seeded" in sources["text_gemma"] and "seeded" in sources["text_head"]  # tiny's: no real weights
    manifest = json.loads((real_bundle / "manifest.json").read_text())
    assert manifest["components"]["vae_decoder"]["build"]["source"] == sources["vae_decoder"]


def test_verify_rebuilds_from_the_recorded_sources(real_bundle: Path, files: dict[str, Path]) -> None:
    reports = verify_bundle(real_bundle, files["dit"], base_checkpoint=files["base"], face_weights=files["face"])
    assert all(r.ok for r in reports.values()), reports  # with the seeded face reused from cache, face fails


def test_verify_refuses_other_files_naming_the_flag(real_bundle: Path, files: dict[str, Path], capsys) -> None:
    with pytest.raises(CheckpointError, match="vae_encoder was built from vae ltx2.safetensors.*--base-checkpoint"):
        verify_bundle(real_bundle, files["dit"], base_checkpoint=_copy_with_other_vae(files),
                      face_weights=files["face"])
    code = main(["verify", str(real_bundle), "--checkpoint", str(files["dit"]), "--base-checkpoint",
                 str(files["base"]), "--face-weights", str(files["other_face"])])
    err = capsys.readouterr().err
    assert code == 2 and "face_encoder was built from face backbone.pth" in err and "--face-weights" in err
    code = main(["verify", str(real_bundle), "--checkpoint", str(files["dit"]), "--base-checkpoint",
                 str(files["base"])])
    err = capsys.readouterr().err
    assert code == 2 and "not seeded weights" in err and "--face-weights" in err


def _copy_with_other_vae(files: dict[str, Path]) -> Path:
    """Another LTX-2 file (other VAE weights): refused by sha256 before any comparison."""
    path = files["folder"] / "other_ltx2.safetensors"
    if not path.is_file():
        preset = get_preset("tiny")
        enc, dec = build_vae(preset.vae, seed=99)
        save_checkpoint(path, build_dit(preset.dit, seed=23).ltx, enc, dec)
    return path


def test_cache_key_changes_with_each_input(files: dict[str, Path]) -> None:
    preset = get_preset("tiny")
    cfg = BuildConfig()
    bucket, _ = check_bucket(cfg)
    spec = component_specs(preset, bucket)["face_encoder"]
    seeded = plan_sources(preset)
    real = plan_sources(preset, face_weights=files["face"])
    other = plan_sources(preset, face_weights=files["other_face"])
    keys = {cache_key(cfg, s, bucket, spec, torch.float32) for s in (seeded, real, other)}
    assert len(keys) == 3
    assert cache_key(cfg, real, bucket, spec, torch.float16) not in keys
    assert cache_key(BuildConfig(layout="overlap"), real, bucket, spec, torch.float32) not in keys


def test_cache_key_is_as_specific_as_the_engine() -> None:
    """The bucket keys only the DiT (RoPE baked); other components by their spec's shapes and dynamic dims;
    a torch/aoti engine also by its backend, device, precision, FP8 scales and compile target."""
    preset, cfg, src = get_preset("tiny"), BuildConfig(), plan_sources(get_preset("tiny"))
    bucket, _ = check_bucket(cfg)
    longer, _ = check_bucket(BuildConfig(frames=bucket.frames + 8))
    wider, _ = check_bucket(BuildConfig(width=bucket.width + 32))
    specs = {b: component_specs(preset, b) for b in (bucket, longer, wider)}

    def key(b, name: str, **engine) -> str:
        return cache_key(cfg, src, b, specs[b][name], torch.float32, **engine)

    for name in ("text_gemma", "text_head", "face_encoder"):
        assert key(bucket, name) == key(longer, name) == key(wider, name)
    assert key(bucket, "vae_encoder") == key(longer, "vae_encoder") != key(wider, "vae_encoder")
    for name in ("dit", "vae_decoder"):
        assert len({key(bucket, name), key(longer, name), key(wider, name)}) == 3
    aoti = dict(backend="aoti", device="cpu", precision="fp32", scales=None, target="avx2")
    engine_keys = {key(bucket, "dit"), key(bucket, "dit", **aoti)} | {
        key(bucket, "dit", **{**aoti, field: value})
        for field, value in (("backend", "torch"), ("device", "cuda"), ("precision", "bf16"), ("scales", "ab"),
                             ("target", "avx512"))}
    assert len(engine_keys) == 7
