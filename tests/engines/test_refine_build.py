"""Building `dit_refine` (engines/build.py, engines/refine.py): the refinement LoRA resolved and checked from its
header before any weight is read; the dit engine of a two-stage build keeps its weights in a file the refinement
engine reads; refusals are one `error:` line, exit 2."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest

from stdrc.engines.build import BuildConfig, build_component
from stdrc.engines.bundle import BundleWriter
from stdrc.engines.refine import RANDOM_LORA_PREFIX, random_refine_lora, refine_component
from stdrc.export.config import get_preset
from stdrc.export.lora import LoraSpec, dit_shapes
from stdrc.export.models import plan_sources
from stdrc.export.refine import load_refine_lora, write_random_lora
from stdrc.export.specs import component_specs
from stdrc.runtime.backends import open_engine
from stdrc.runtime.manifest import Bucket, sha256_file


def test_random_lora_is_seeded_and_named(tmp_path):
    preset = get_preset("tiny")
    one = random_refine_lora(preset, 0, tmp_path / "a")
    again = random_refine_lora(preset, 0, tmp_path / "b")
    other = random_refine_lora(preset, 1, tmp_path / "c")
    assert one.path.name == f"{RANDOM_LORA_PREFIX}tiny-seed0.safetensors" and one.strength == 1.0
    assert sha256_file(one.path) == sha256_file(again.path) != sha256_file(other.path)
    lora = load_refine_lora(one, preset.dit)
    assert all(p.rank == 4 for p in lora.pairs.values())


@pytest.mark.slow  # a DiT engine build (20 s)
def test_dit_and_dit_refine_components(tmp_path, cache_dir):
    """The two-stage dit engine has external weights; dit_refine's entry lists them with the dit's own sha256,
    adds the LoRA's data file, and loads and runs through the runtime's engine."""
    cfg = BuildConfig(out=tmp_path / "bundle", cache_dir=cache_dir, backend="onnxruntime", two_stage=True,
                      rope="input", progress=False)
    preset = get_preset("tiny")
    bucket = Bucket(**{**preset.default_bucket, "width": 128})  # a two-stage size (two_stage_bundle's)
    src = plan_sources(preset)
    specs = component_specs(preset, bucket, rope_input=True, two_stage=True)
    lora = load_refine_lora(LoraSpec(write_random_lora(tmp_path / "r.safetensors", preset.dit), 0.5), preset.dit)
    with BundleWriter(cfg.out) as writer:
        dit = build_component(cfg, "onnxruntime", src, bucket, specs["dit"], writer, lambda: None)
        assert dit.extra_files and all((writer.staging / f).is_file() for f in dit.extra_files)
        refine = refine_component(dit, writer.staging, specs["dit_refine"], lora, dit_shapes(preset.dit))
        assert refine.file == "dit_refine.onnx" and refine.precision == dit.precision
        assert {k: v for k, v in refine.extra_files.items() if k in dit.extra_files} == dit.extra_files
        own = set(refine.extra_files) - set(dit.extra_files)
        assert own == {"dit_refine.onnx.data"}
        for name, digest in refine.extra_files.items():
            assert sha256_file(writer.staging / name) == digest
        assert refine.build.source == {"refine_lora": {"file": "r.safetensors", "sha256": lora.sha256,
                                                       "strength": 0.5}}
        assert [t.name for t in refine.inputs] == [t.name for t in dit.inputs]
        feeds = specs["dit_refine"].sample_inputs(seed=2, batch=1)
        base = open_engine(writer.staging, "dit", dit).run(feeds)["velocity"]
        refined = open_engine(writer.staging, "dit_refine", refine).run(feeds)["velocity"]
        assert refined.shape == base.shape and np.isfinite(refined).all()
        assert np.linalg.norm(refined - base) / np.linalg.norm(base) > 1e-2  # the LoRA's branches ran
        inline = onnx.load(str(writer.staging / "dit.onnx"), load_external_data=False)
        assert sum(t.data_location == onnx.TensorProto.EXTERNAL for t in inline.graph.initializer) > 10


def _refused(argv: list[str], message: str, tmp_path: Path, capsys, monkeypatch) -> None:
    from stdrc.engines.cli import main
    from stdrc.export import models

    reads = []
    monkeypatch.setattr(models, "_load_component", lambda *a, **k: reads.append(a))  # would read weights
    out = tmp_path / "bundle"
    rc = main(["build-engines", *argv, "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and re.search(message, err[0]), err
    assert not reads and not out.exists()


def test_torch_backend_refuses_two_stage(tmp_path, capsys, monkeypatch):
    """torch programs hold their weights: a refinement program would be a second copy of the DiT."""
    _refused(["--preset", "tiny", "--two-stage", "--bucket", "9x128x64", "--backend", "torch"],
             "builds no refinement engine", tmp_path, capsys, monkeypatch)


def test_aoti_two_stage_below_fp32_is_refused(tmp_path, capsys, monkeypatch):
    """aoti's bf16/fp8 fast path bakes one grid's RoPE tables; two stages run two grids."""
    _refused(["--preset", "tiny", "--two-stage", "--bucket", "9x128x64", "--backend", "aoti", "--precision", "bf16"],
             "bakes the RoPE tables", tmp_path, capsys, monkeypatch)


def test_lora_of_another_model_is_refused_before_any_weight(tmp_path, capsys, monkeypatch):
    """An LTX-2.3 refinement LoRA for an LTX-2 DiT (tiny), and one for a deeper DiT: one line naming the mismatch."""
    from stdrc.export.upsampler import TINY_UPSAMPLER, build_upsampler, save_upsampler

    up = save_upsampler(tmp_path / "up.safetensors", build_upsampler(TINY_UPSAMPLER, 0), TINY_UPSAMPLER)
    other = write_random_lora(tmp_path / "ltx23.safetensors", get_preset("tiny23").dit)
    deeper = write_random_lora(tmp_path / "deep.safetensors", replace(get_preset("tiny").dit, num_layers=3))
    for lora, message in ((f"{other}:0.8", "is not a LoRA for this LTX-2 video DiT|targets that are not DiT"),
                          (str(deeper), "another model or depth")):
        _refused(["--preset", "tiny", "--upsampler", str(up), "--refine-lora", lora, "--bucket", "9x128x64",
                  "--backend", "onnxruntime"], message, tmp_path / message[:4], capsys, monkeypatch)


def test_verify_takes_the_bundles_refinement_lora_or_says_which(tmp_path):
    """verify's refinement LoRA: the tiny presets' seeded one made again (same sha256), a given file checked against
    the manifest's entry, and without one a LoRA error naming the flag."""
    from stdrc.engines.verify import refine_lora_for_verify
    from stdrc.export.errors import LoraError

    preset = get_preset("tiny")
    made = load_refine_lora(random_refine_lora(preset, 0, tmp_path / "build"), preset.dit).entry()
    again = refine_lora_for_verify(made, None, preset, 0, tmp_path / "bundle", tmp_path / "verify")
    assert sha256_file(again.path) == made.sha256 and again.strength == made.strength
    given = write_random_lora(tmp_path / "distilled.safetensors", preset.dit, seed=9)
    entry = load_refine_lora(LoraSpec(given, 0.6), preset.dit).entry()
    assert refine_lora_for_verify(entry, LoraSpec(given), preset, 0, tmp_path).strength == 0.6
    with pytest.raises(LoraError, match="pass it as --refine-lora FILE"):
        refine_lora_for_verify(entry, None, preset, 0, tmp_path)
    with pytest.raises(LoraError, match="is not the refinement LoRA of"):
        refine_lora_for_verify(entry, LoraSpec(again.path), preset, 0, tmp_path, tmp_path / "verify")
    with pytest.raises(LoraError, match="differs from the strength 0.6"):
        refine_lora_for_verify(entry, LoraSpec(given, 0.5), preset, 0, tmp_path, tmp_path / "verify")


@pytest.mark.slow  # a verify of the shared two-stage bundle (~30 s; tiny23: a bundle build of its own)
@pytest.mark.parametrize("preset", ["tiny", "tiny23"])
def test_two_stage_bundle_refines_on_the_dits_weights_and_verifies(preset, request, tmp_path, capsys):
    """The tiny (and tiny23: LTX-2.3's DiT) two-stage bundle: two_stage.lora is the seeded random LoRA, dit_refine
    reads the dit's weights file (same sha256) and verifies against the DiT with that LoRA fused; another LoRA is
    one error line."""
    from stdrc.engines.cli import main
    from stdrc.runtime.manifest import read_manifest

    two_stage_bundle = request.getfixturevalue({"tiny": "two_stage_bundle", "tiny23": "two_stage_tiny23_bundle"}
                                               [preset])
    manifest = read_manifest(two_stage_bundle)
    lora = manifest.two_stage.lora
    assert lora.name == f"{RANDOM_LORA_PREFIX}{preset}-seed0.safetensors" and lora.strength == 1.0
    dit, refine = manifest.components["dit"], manifest.components["dit_refine"]
    assert dit.extra_files == {"dit.onnx.data": refine.extra_files["dit.onnx.data"]}
    assert set(refine.extra_files) == {"dit.onnx.data", "dit_refine.onnx.data"}
    assert main(["verify", str(two_stage_bundle), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)["components"]["dit_refine"]
    assert report["ok"] and report["rel_l2"] <= 1e-5 and report["tolerance"] == 1e-4
    other = write_random_lora(tmp_path / "other.safetensors", get_preset(preset).dit, seed=5)
    assert main(["verify", str(two_stage_bundle), "--refine-lora", str(other)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not the refinement LoRA of" in err[0], err


@pytest.mark.slow  # an fp16 DiT export (20 s)
def test_fp16_dit_refine_on_tiny23(tmp_path, cache_dir):
    """fp16 (the CUDA EP's engines, run here on CPU): the branches find every target of LTX-2.3's DiT (gates,
    prompt AdaLN), keep the LoRA in bf16 on disk with Casts to fp16, and equal the fp32 PyTorch refinement at
    fp16's verify tolerance."""
    import torch

    from stdrc.export.dit import build_dit
    from stdrc.export.refine import add_lora_branches

    preset = get_preset("tiny23")
    bucket = Bucket(**{**preset.default_bucket, "width": 128, "height": 64})
    cfg = BuildConfig(out=tmp_path / "bundle", cache_dir=cache_dir, backend="onnxruntime", precision="fp16",
                      two_stage=True, rope="input", progress=False)
    specs = component_specs(preset, bucket, rope_input=True, two_stage=True)
    lora = load_refine_lora(LoraSpec(write_random_lora(tmp_path / "r.safetensors", preset.dit), 0.5), preset.dit)
    with BundleWriter(cfg.out) as writer:
        dit = build_component(cfg, "onnxruntime", plan_sources(preset), bucket, specs["dit"], writer, lambda: None)
        refine = refine_component(dit, writer.staging, specs["dit_refine"], lora, dit_shapes(preset.dit))
        graph = onnx.load(str(writer.staging / refine.file), load_external_data=False)
        casts = [n for n in graph.graph.node if n.op_type == "Cast" and n.name.startswith("lora")]
        assert len(casts) == 2 * len(lora.pairs) and all(a.i == onnx.TensorProto.FLOAT16
                                                         for n in casts for a in n.attribute)
        feeds = specs["dit_refine"].sample_inputs(seed=3, batch=1)
        got = open_engine(writer.staging, "dit_refine", refine).run(feeds)["velocity"]
    with torch.no_grad():
        module = add_lora_branches(build_dit(preset.dit, seed=0), lora)
        want = module(*[torch.from_numpy(feeds[t.name]) for t in specs["dit"].inputs]).numpy()
    assert np.linalg.norm(got - want) / np.linalg.norm(want) <= 1e-2
