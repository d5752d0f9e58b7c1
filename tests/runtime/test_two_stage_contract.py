"""The two-stage bundle contract (issue 27): `Bucket.half()`, the manifest's `two_stage` section and stage-1
RoPE entries, the stage components' specs, the `stages` option, and the build refusals that read no weight."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from stdrc.engines.build import write_rope_tables
from stdrc.export.config import get_preset
from stdrc.export.specs import component_specs
from stdrc.runtime import schema as sc
from stdrc.runtime.errors import BundleError, InputError
from stdrc.runtime.manifest import MANIFEST_NAME, Bucket, Manifest, bundle_files
from stdrc.runtime.options import GenerationOptions
from stdrc.runtime.pipeline import Pipeline
from stdrc.runtime.vocab import STAGE_COMPONENTS

LORA = {"name": "distilled-lora-384.safetensors", "sha256": "ab" * 32, "strength": 0.8}


def test_half_is_the_stage1_bucket_and_needs_multiples_of_64() -> None:
    b = Bucket(frames=17, height=512, width=768, text_length=1024, fps=25.0)
    h = b.half()
    assert (h.frames, h.height, h.width, h.text_length, h.fps) == (17, 256, 384, 1024, 25.0)
    assert h.video_tokens * 4 == b.video_tokens and h.latent_frames == b.latent_frames
    with pytest.raises(InputError, match=r"width=96 is not a multiple of 64, .*use --width 64 or 128"):
        Bucket(9, 64, 96, 16).half()
    with pytest.raises(InputError, match=r"height=160 is not a multiple of 64, .*use --height 128 or 192"):
        Bucket(9, 160, 128, 16).half()


def two_stage_json(one_stage: dict) -> dict:
    """A one-stage tiny manifest edited into a two-stage one (128x64 bucket, RoPE fed, stage components)."""
    data = copy.deepcopy(one_stage)
    for key in ("bucket",):
        data.pop(key)
    bucket = {**data["buckets"][0], "width": 128, "latent_grid": None, "video_tokens": None}
    b = Bucket(bucket["frames"], bucket["height"], 128, bucket["text_length"], bucket["fps"])
    bucket.update(latent_grid=[b.latent_frames, b.latent_height, b.latent_width], video_tokens=b.video_tokens,
                  reference_tokens=b.reference_tokens,
                  rope={"file": data["rope"]["file"], "sha256": data["rope"]["sha256"]},
                  stage1={"rope": {"file": "rope_s1.npz", "sha256": "02" * 32}})
    data["buckets"] = [bucket]
    dit = data["components"]["dit"]
    dit["inputs"] += [{"name": "rope_cos", "shape": [1, "tokens", 64], "dtype": "float32"},
                      {"name": "rope_sin", "shape": [1, "tokens", 64], "dtype": "float32"}]
    data["rope"]["baked_in_dit"] = False
    data["components"]["dit_refine"] = {**copy.deepcopy(dit), "file": "dit_refine.onnx"}
    data["components"]["upsampler"] = {**copy.deepcopy(data["components"]["vae_encoder"]), "file": "upsampler.onnx"}
    data["two_stage"] = {"sigmas": [0.909375, 0.725, 0.421875, 0.0], "lora": dict(LORA), "default_stages": 2}
    return data


@pytest.fixture(scope="module")
def one_stage(tiny_bundle: Path) -> dict:
    return json.loads((tiny_bundle / MANIFEST_NAME).read_text())


def test_two_stage_manifest_round_trip(one_stage: dict) -> None:
    data = two_stage_json(one_stage)
    m = Manifest.from_json(data)
    ts = m.two_stage
    assert ts == sc.TwoStageConfig(lora=sc.LoraEntry(LORA["name"], LORA["sha256"], 0.8))
    assert ts.sigmas == sc.STAGE2_SIGMAS and m.default_stages == 2 and set(STAGE_COMPONENTS) <= set(m.components)
    assert m.bucket.stage1 == sc.Stage1Tables(rope=sc.TableFile(file="rope_s1.npz", sha256="02" * 32))
    back = m.to_json()
    assert back["two_stage"] == data["two_stage"]
    assert back["buckets"][0]["stage1"] == {"rope": {"file": "rope_s1.npz", "sha256": "02" * 32}}
    assert Manifest.from_json(json.loads(json.dumps(back))) == m
    assert bundle_files(m)["rope_s1.npz"] == "02" * 32  # hashed and checked like every bundle file
    # defaults: a section giving only the LoRA
    data["two_stage"] = {"lora": dict(LORA)}
    assert Manifest.from_json(data).two_stage == ts


def test_one_stage_manifests_read_as_before(one_stage: dict) -> None:
    m = Manifest.from_json(one_stage)
    assert m.two_stage is None and m.default_stages == 1 and m.bucket.stage1 is None
    assert "two_stage" not in m.to_json() and "stage1" not in m.to_json()["buckets"][0]
    assert m.to_json() == one_stage


def _without(data: dict, *keys: str) -> dict:
    for key in keys:
        where, _, name = key.rpartition(".")
        target = data
        for part in filter(None, where.split(".")):
            target = target[int(part)] if isinstance(target, list) else target[part]
        del target[name]
    return data


@pytest.mark.parametrize("edit, words", [
    (lambda d: _without(d, "two_stage"), "two_stage is None, expected a two_stage section (the bundle holds "
                                         "upsampler, dit_refine)"),
    (lambda d: _without(d, "components.upsampler"), "expected upsampler too (a two_stage bundle)"),
    (lambda d: _without(d, "components.dit_refine", "components.upsampler"), "expected upsampler, dit_refine too"),
    (lambda d: _without(d, "components.dit_refine", "components.upsampler", "two_stage"), None),  # one stage
    (lambda d: d["buckets"][0].update(stage1={}), "lacks buckets[0].stage1.rope"),
    (lambda d: _without(d, "buckets.0.stage1"), "buckets[0].stage1 is None, expected the stage-1 RoPE"),
    (lambda d: d["two_stage"].update(sigmas=[1.0, 0.5, 0.0]), "sigmas from a re-noise level below 1"),
    (lambda d: d["two_stage"].update(sigmas=[0.9, 0.5]), "sigmas from a re-noise level below 1 down to 0"),
    (lambda d: d["two_stage"].update(default_stages=3), "two_stage.default_stages is 3, expected an integer in 1..2"),
    (lambda d: d["two_stage"]["lora"].update(sha256="x"), "two_stage.lora.sha256 is 'x'"),
    (lambda d: _without(d, "two_stage.lora"), "lacks two_stage.lora"),
    (lambda d: d["components"].update(extra=d["components"]["dit"]), "components among text_gemma, text_head"),
])
def test_two_stage_manifest_refusals(one_stage: dict, edit, words: str | None) -> None:
    data = two_stage_json(one_stage)
    edit(data)
    if words is None:
        assert Manifest.from_json(data).two_stage is None
        return
    with pytest.raises(BundleError) as info:
        Manifest.from_json(data)
    message = str(info.value)
    assert words in message and "rebuild" in message and "\n" not in message, message


def test_two_stage_bucket_not_multiple_of_64_or_baked_rope_is_refused(one_stage: dict) -> None:
    data = two_stage_json(one_stage)
    data["buckets"][0].update(width=96, latent_grid=[2, 2, 3], video_tokens=12, reference_tokens=6)
    with pytest.raises(BundleError, match=r"buckets\[0\]: width=96 is not a multiple of 64.*rebuild"):
        Manifest.from_json(data)
    data = two_stage_json(one_stage)
    data["components"]["dit"]["inputs"] = data["components"]["dit"]["inputs"][:-2]
    data["rope"]["baked_in_dit"] = True
    with pytest.raises(BundleError, match="rope.baked_in_dit is True, expected false in a two_stage bundle"):
        Manifest.from_json(data)


def test_specs_serve_both_grids() -> None:
    preset = get_preset("tiny")
    b = Bucket(9, 64, 128, 16)
    h = b.half()
    one = component_specs(preset, b, rope_input=True)
    two = component_specs(preset, b, rope_input=True, two_stage=True)
    assert set(one) | set(STAGE_COMPONENTS) == set(two)
    dit = two["dit"]
    assert dit.dynamic_dims["tokens"] == [h.tokens, b.tokens, b.tokens]
    assert [p["tokens"] for p in dit.bucket_dims] == [[b.tokens] * 3, [h.tokens] * 3]  # a TensorRT profile each
    enc = two["vae_encoder"]
    assert (enc.dynamic_dims["height"], enc.dynamic_dims["width"]) == ([32, 64, 64], [64, 128, 128])
    assert two["vae_decoder"].inputs == one["vae_decoder"].inputs and not two["vae_decoder"].dynamic_dims
    up = two["upsampler"]
    c = preset.vae.latent_channels
    assert up.inputs[0].shape == (1, c, h.latent_frames, h.latent_height, h.latent_width)
    assert up.outputs[0].shape == (1, c, b.latent_frames, b.latent_height, b.latent_width)
    assert up.sample_inputs()["latent"].shape == up.inputs[0].shape
    refine = two["dit_refine"]
    assert [t.name for t in refine.inputs] == [t.name for t in one["dit"].inputs]
    assert [t.shape for t in refine.inputs] == [t.shape for t in one["dit"].inputs]  # the output grid only
    assert refine.outputs == one["dit"].outputs
    # several buckets: the upsampler's latent sizes span them, a profile per bucket
    big = Bucket(9, 128, 128, 16)
    up2 = component_specs(preset, (b, big), rope_input=True, two_stage=True)["upsampler"]
    assert up2.dynamic_dims == {"latent_height": [1, 1, 2]}
    assert up2.outputs[0].shape[3] == "latent_height*2"
    assert [p["latent_height"] for p in up2.bucket_dims] == [[1] * 3, [2] * 3]
    refine2 = component_specs(preset, (b, big), rope_input=True, two_stage=True)["dit_refine"]
    assert refine2.dynamic_dims["tokens"] == [b.tokens, b.tokens, big.tokens]


def test_stage1_rope_tables_are_written_beside_each_buckets(tiny_models, tmp_path: Path) -> None:
    from stdrc.engines.bundle import BundleWriter

    buckets = (Bucket(9, 64, 128, 16), Bucket(9, 128, 128, 16))
    with BundleWriter(tmp_path / "out") as writer:
        named, _ = write_rope_tables(tiny_models, buckets, "tass", writer, two_stage=True)
        assert [(x.rope.file, x.stage1.rope.file) for x in named] == [
            ("rope.npz", "rope_s1.npz"), ("rope_9x128x128.npz", "rope_s1_9x128x128.npz")]
        for x in named:
            with np.load(writer.path(x.stage1.rope.file)) as s1, np.load(writer.path(x.rope.file)) as own:
                _, tables = tiny_models.rope(x.half(), "tass")
                np.testing.assert_array_equal(s1["cos"], tables.cos.numpy())
                assert s1["cos"].shape[1] == x.half().tokens and own["cos"].shape[1] == x.tokens
        one, _ = write_rope_tables(tiny_models, buckets[:1], "tass", writer)
        assert one[0].stage1 is None


def test_stages_option(tiny_bundle: Path) -> None:
    with pytest.raises(InputError, match=r"stages=3: use --stages 1 or 2"):
        GenerationOptions("p", stages=3)
    checks = Pipeline.for_checks(tiny_bundle)
    assert checks.resolve(GenerationOptions("p")).stages == 1  # a one-stage bundle's default
    assert checks.resolve(GenerationOptions("p", stages=1)).stages == 1
    with pytest.raises(InputError, match=r"this bundle has one stage .*pass --stages 1 or leave it out"):
        checks.resolve(GenerationOptions("p", stages=2))
