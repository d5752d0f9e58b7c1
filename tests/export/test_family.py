"""LTX-2 or LTX-2.3 from a checkpoint's header; a file of neither is refused before any weight is read."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from bench import bench_module  # tests/bench.py
from refusals import assert_build_refused_before_any_read  # tests/refusals.py
from safetensors import safe_open
from safetensors.torch import save_file

from stdrc.export import checkpoint
from stdrc.export.checkpoint import V2_CAPTION_CONFIG, open_checkpoint
from stdrc.export.config import LTX23_VAE, ModelFamily, Preset, get_preset
from stdrc.export.errors import CheckpointError
from stdrc.export.family import detect_family
from stdrc.runtime.vocab import MODEL_FAMILIES

FLAGS_23 = {"apply_gated_attention": True, "cross_attention_adaln": True, **V2_CAPTION_CONFIG}


def tiny23() -> Preset:
    """The tiny23 preset (LTX-2.3's DiT flags, a gated connector as wide as the DiT) with the V2 text
    projection: every LTX-2.3 flag set."""
    preset = get_preset("tiny23")
    return replace(preset, text=replace(preset.text, per_token_projection=True))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    synthetic = bench_module("synthetic")
    folder = tmp_path_factory.mktemp("family")
    return {name: synthetic.write_checkpoint(folder / f"{name}.safetensors", preset, 2, dtype=torch.float32)
            for name, preset in (("ltx2", get_preset("tiny")), ("ltx23", tiny23()))}


def test_real_layout_files_of_each_family(files: dict[str, Path]) -> None:
    for name, family in (("ltx2", ModelFamily.LTX2), ("ltx23", ModelFamily.LTX23)):
        lazy = open_checkpoint(files[name], sha256="-")
        assert detect_family(lazy.path, lazy.metadata_config, lazy.model_version, lazy.shapes) is family
    assert open_checkpoint(files["ltx23"], sha256="-").model_version == "2.3.0"
    assert get_preset("tiny").family is ModelFamily.LTX2 and tiny23().family is ModelFamily.LTX23
    assert tuple(f.value for f in ModelFamily) == MODEL_FAMILIES  # what the manifest reader accepts


@pytest.mark.parametrize("transformer, version, family", [
    ({}, None, ModelFamily.LTX2),  # no config: ltx-core's defaults are LTX-2's
    ({"apply_gated_attention": False, "cross_attention_adaln": False, "qk_norm": "rms_norm"}, "2.0",
     ModelFamily.LTX2),
    (FLAGS_23, None, ModelFamily.LTX23),
    (FLAGS_23, "2.3.1", ModelFamily.LTX23),
    ({**FLAGS_23, "some_new_key": 7}, "2.3", ModelFamily.LTX23),  # ltx-core does not read it: no effect
])
def test_family_from_metadata(transformer: dict, version: str | None, family: ModelFamily) -> None:
    assert detect_family(Path("f"), {"transformer": transformer}, version, ["proj_out.weight"]) is family


NEITHER = {
    "partial V2 set": ({"caption_proj_before_connector": True}, None, [],
                       r"caption_proj_input_norm missing"),
    "V2 key of another value": ({**FLAGS_23, "caption_proj_input_norm": True}, None, [],
                                r"caption_proj_input_norm=True"),
    "gated attention alone": ({"apply_gated_attention": True}, None, [],
                              r"mixes the two \(LTX-2: cross_attention_adaln, the V2 caption keys; "
                              r"LTX-2\.3: apply_gated_attention\)"),
    "2.3 version, LTX-2 flags": ({}, "2.3.0", [], r"LTX-2\.3: model_version '2\.3\.0'"),
    "flag not a boolean": ({"apply_gated_attention": "yes"}, None, [], r"apply_gated_attention is 'yes'"),
    "fixed key changed": ({"qk_norm": "layer_norm"}, None, [],
                          r"transformer\.qk_norm is 'layer_norm', which changes the model's arithmetic"),
    "both key sets": ({}, None, ["caption_projection.linear_1.weight",
                                 "transformer_blocks.0.attn1.to_gate_logits.weight"],
                      r"holds tensors of both"),
    "2.3 tensors, no config": (None, None, ["prompt_adaln_single.linear.weight"],
                               r"holds LTX-2\.3 tensors \(prompt_adaln_single\.linear\.weight\) "
                               r"but no config metadata"),
    "LTX-2 tensors, 2.3 config": (FLAGS_23, None, ["text_embedding_projection.aggregate_embed.weight"],
                                  r"holds LTX-2 tensors .* config metadata says LTX-2\.3"),
}


@pytest.mark.parametrize("case", list(NEITHER))
def test_neither_family_is_one_error(case: str) -> None:
    transformer, version, keys, message = NEITHER[case]
    config = None if transformer is None else {"transformer": transformer}
    with pytest.raises(CheckpointError, match=message) as e:
        detect_family(Path("f.safetensors"), config, version, keys)
    text = str(e.value)
    assert text.startswith("f.safetensors matches neither LTX-2 nor LTX-2.3: ") and "\n" not in text


def _rewrite(src: Path, dst: Path, transformer: dict | None = None, version: str | None = None,
             extra: dict[str, torch.Tensor] | None = None) -> Path:
    with safe_open(str(src), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = dict(f.metadata())
    config = json.loads(meta["config"])
    config["transformer"].update(transformer or {})
    meta["config"] = json.dumps(config)
    if version is not None:
        meta["model_version"] = version
    save_file({**tensors, **(extra or {})}, str(dst), metadata=meta)
    return dst


CLI = {  # file, header change, the one error line
    "partial V2 set": ("ltx2", {"caption_proj_before_connector": True}, None, {},
                       r"matches neither LTX-2 nor LTX-2\.3: .*caption_projection_first_linear missing"),
    "mixed flags": ("ltx2", {"cross_attention_adaln": True}, None, {}, r"mixes the two"),
    "2.3 model_version on LTX-2": ("ltx2", {}, "2.3.0", {}, r"mixes the two"),
    "arithmetic key": ("ltx2", {"norm_elementwise_affine": True}, None, {},
                       r"changes the model's arithmetic"),
    "mixed tensors": ("ltx2", {}, None,
                      {"model.diffusion_model.transformer_blocks.0.attn1.to_gate_logits.weight":
                       torch.zeros(2, 2)},
                      r"holds tensors of both"),
}


@pytest.mark.parametrize("case", list(CLI))
def test_build_engines_refuses_before_any_read(files: dict[str, Path], tmp_path: Path, case: str, monkeypatch,
                                               capsys) -> None:
    name, transformer, version, extra, message = CLI[case]
    bad = _rewrite(files[name], tmp_path / "bad.safetensors", transformer, version, extra)
    assert_build_refused_before_any_read(bad, tmp_path, message, monkeypatch, capsys)


def test_ltx23_file_builds_and_verifies(files: dict[str, Path], tmp_path: Path, cache_dir: Path, capsys) -> None:
    """A real-layout LTX-2.3 file (tiny23 width, audio stream included) through build-engines and verify: the
    bundle records its family, and every engine equals the PyTorch module loaded from the same file. The
    session's stage cache: the seeded text encoder and face encoder come from an earlier tiny23 build's."""
    from stdrc.engines.cli import main
    from stdrc.engines.verify import REF_FILE_CONFIG
    from stdrc.runtime.manifest import read_manifest

    bundle = tmp_path / "bundle"
    assert main(["build-engines", "--preset", "tiny23", "--checkpoint", str(files["ltx23"]), "--backend",
                 "onnxruntime", "--out", str(bundle), "--cache-dir", str(cache_dir), "-q"]) == 0
    manifest = read_manifest(bundle)
    assert manifest.model_config.family == "ltx2.3" and manifest.checkpoint_sha256
    assert {t.name for t in manifest.components["dit"].inputs} >= {"sigma"}
    capsys.readouterr()
    assert main(["verify", str(bundle), "--checkpoint", str(files["ltx23"]), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["family"] == "ltx2.3"
    assert set(report["components"]) == set(manifest.components)
    for name in ("dit", "vae_encoder", "vae_decoder"):  # ltx-core's modules from the file's config
        assert report["components"][name]["reference"] == REF_FILE_CONFIG, name
    from stdrc.engines.verify import verify_bundle

    other = r"ltx2\.safetensors is an LTX-2 checkpoint and the bundle LTX-2\.3"
    with pytest.raises(CheckpointError, match=other):
        verify_bundle(bundle, files["ltx2"])


def test_base_checkpoint_of_another_family_is_refused(files: dict[str, Path]) -> None:
    from stdrc.export.models import load_models

    message = r"ltx2\.safetensors is an LTX-2 checkpoint but --base-checkpoint ltx23\.safetensors is LTX-2\.3"
    with pytest.raises(CheckpointError, match=message):
        load_models("tiny", checkpoint=files["ltx2"], base_checkpoint=files["ltx23"], components=("dit",))


def test_sampling_defaults_follow_the_family() -> None:
    """ltx-pipelines' defaults (LTX23.md 2): 40 steps for LTX-2, 30 for LTX-2.3, video CFG 3.0 both; a preset
    that sets none takes its family's, also when a checkpoint's metadata makes it the other family."""
    ltx2, ltx23 = get_preset("ltx2-video"), get_preset("ltx23-video")
    assert (ltx2.family, ltx2.steps, ltx2.text_scale) == (ModelFamily.LTX2, 40, 3.0)
    assert (ltx23.family, ltx23.steps, ltx23.text_scale) == (ModelFamily.LTX23, 30, 3.0)
    assert ltx23.dit.inner_dim == ltx23.text.connector_dim == ltx23.dit.context_dim == 4096
    assert (ltx23.text.connector_layers, ltx23.text.connector_gated_attention, ltx23.vae) == (8, True, LTX23_VAE)
    as_23 = checkpoint.config_from_metadata(ltx2, {"transformer": {
        **FLAGS_23, "connector_num_attention_heads": 32, "connector_attention_head_dim": 128}})
    assert (as_23.family, as_23.steps) == (ModelFamily.LTX23, 30)
    assert (get_preset("tiny").steps, get_preset("tiny23").steps) == (8, 30)  # tiny sets its own


def test_file_without_config_needs_a_preset_of_its_family(files: dict[str, Path], tmp_path: Path) -> None:
    """A 2.3 file's config sets every flag whatever the preset; with no config the preset must match."""
    from stdrc.export.models import plan_sources

    assert plan_sources(get_preset("tiny"), files["ltx23"], components=()).preset.family is ModelFamily.LTX23
    with safe_open(str(files["ltx2"]), framework="pt") as f:
        bare = tmp_path / "no-config.safetensors"
        save_file({k: f.get_tensor(k) for k in f.keys()}, str(bare))
    message = r"no-config\.safetensors is an LTX-2 checkpoint and preset tiny23 LTX-2\.3: pick a preset"
    with pytest.raises(CheckpointError, match=message):
        plan_sources(get_preset("tiny23"), bare, components=())
