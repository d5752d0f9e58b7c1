"""The typed manifest: sections written and read through the same dataclasses, the manifest's sigmas
used by Python as by C++, one `rope_input`, old manifests still read."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from stdrc.runtime import schema as sc
from stdrc.runtime.errors import BundleError
from stdrc.runtime.manifest import MANIFEST_NAME, Manifest, read_manifest
from stdrc.runtime.pipeline import Pipeline
from stdrc.runtime.sampler import ltx2_sigmas


def _copy(bundle: Path, folder: Path, edit) -> Path:
    """The bundle with its manifest edited (engines copied: the bundle is shared by the session)."""
    shutil.copytree(bundle, folder)
    path = folder / MANIFEST_NAME
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    return folder


def _sections() -> list[type]:
    return [Manifest, *[c for c in vars(sc).values() if isinstance(c, type) and issubclass(c, sc.Section)
                        and c is not sc.Section]]


def test_every_section_is_typed() -> None:
    """No section (or field of one) is an untyped dict: each value is read by a checking reader."""
    for cls in _sections():
        for f in dataclasses.fields(cls):
            assert "Any" not in str(f.type), (cls.__name__, f.name, f.type)
            assert cls is Manifest or "read" in f.metadata, (cls.__name__, f.name)


def test_written_manifest_is_the_typed_one(tiny_bundle: Path) -> None:
    """The file on disk is exactly what the dataclasses write, and reads back equal (one field list)."""
    data = json.loads((tiny_bundle / MANIFEST_NAME).read_text())
    m = Manifest.from_json(data)
    assert m.to_json() == data
    assert Manifest.from_json(json.loads(json.dumps(m.to_json()))) == m
    assert m.model_config.family == "ltx2" and isinstance(m.model_config.dit, sc.DitModel)
    assert m.rope_input is False and m.rope.baked_in_dit is True


def test_python_runs_the_manifests_sigmas_and_steps_override_them(tiny_bundle: Path, tmp_path: Path) -> None:
    """Rule: the manifest's `sampler.sigmas` are the schedule of its `steps` (computed once, at build, by
    `SamplerConfig.schedule` = `ltx2_sigmas` with the manifest's shift); Python runs them as C++ does, and
    `--steps N` (N other than the manifest's) is computed by that same function."""
    m = read_manifest(tiny_bundle)
    s = m.sampler
    assert np.array_equal(s.schedule(s.steps), np.array(s.sigmas, np.float32))  # the build wrote this
    assert np.array_equal(s.schedule(s.steps), ltx2_sigmas(s.steps, s.shift_tokens, s.max_shift, s.base_shift,
                                                           s.terminal))
    pipe = Pipeline.from_bundle(tiny_bundle, prompt_cache=None)
    assert np.array_equal(pipe.sigmas(None, False), np.array(s.sigmas, np.float32))
    assert np.array_equal(pipe.sigmas(s.steps, False), np.array(s.sigmas, np.float32))
    assert np.array_equal(pipe.sigmas(None, True), np.array(s.distilled_sigmas, np.float32))
    other = s.steps + 3
    assert np.array_equal(pipe.sigmas(other, False), s.schedule(other))
    assert len(s.schedule(other)) == other + 1
    # the manifest's values are the ones used: another valid list in the manifest is what Python runs
    mine = [1.0, 0.5, 0.25, 0.0]
    edited = _copy(tiny_bundle, tmp_path / "edited", lambda d: d["sampler"].update(sigmas=mine, steps=3))
    pipe = Pipeline.from_bundle(edited, prompt_cache=None)
    assert np.array_equal(pipe.sigmas(None, False), np.array(mine, np.float32))
    assert np.array_equal(pipe.sigmas(2, False), s.schedule(2))


def test_steps_override_runs_that_many_steps(tiny_bundle: Path, astronaut_png: Path) -> None:
    pipe = Pipeline.from_bundle(tiny_bundle, prompt_cache=None)
    steps = []
    pipe.generate(reference=astronaut_png, prompt="hi", steps=2, face_crop=False,
                  on_step=lambda i, total: steps.append((i, total)))
    assert steps == [(0, 2), (1, 2)] and pipe.manifest.sampler.steps != 2


def test_rope_input_and_baked_in_dit_must_agree(tiny_bundle: Path, tmp_path: Path) -> None:
    bundle = _copy(tiny_bundle, tmp_path / "b", lambda d: d["rope"].update(baked_in_dit=False))
    with pytest.raises(BundleError, match=r"rope.baked_in_dit is False, expected True .*rebuild"):
        read_manifest(bundle)


def test_old_manifests_read_with_defaults(tiny_bundle: Path) -> None:
    """Manifests before the family, the text heads/ffn, the memory and the tokenizer padding side."""
    data = json.loads((tiny_bundle / MANIFEST_NAME).read_text())
    del data["model_config"]["family"]
    for key in ("encoder_heads", "encoder_ffn"):
        data["model_config"]["text"].pop(key, None)
    data["model_config"]["dit"]["rope_type"] = "split"  # the whole export config, as old builds wrote it
    for key in ("quality", "memory", "created_by", "decode"):
        del data[key]
    del data["rope"]["baked_in_dit"]
    m = Manifest.from_json(data)
    assert m.model_config.family == "ltx2" and m.model_config.text.encoder_heads is None
    assert m.model_config.text.heads == 1 and m.model_config.text.ffn == 4 * m.model_config.text.encoder_dim
    assert m.memory == sc.MemoryConfig() and m.decode is None and m.quality.fp8 is None
    assert "rope_type" not in m.to_json()["model_config"]["dit"]


@pytest.mark.parametrize("path, value, word", [
    (["model_config", "family"], "wan", "model_config.family is 'wan', expected one of ltx2"),
    (["model_config", "dit", "num_layers"], 0, "model_config.dit.num_layers is 0, expected an integer >= 1"),
    (["sampler", "sigmas"], [0.5, 1.0], "sampler.sigmas is [0.5, 1.0], expected at least 2 non-increasing"),
    (["text", "file"], "../tokenizer.json", "leaves the bundle folder"),
    (["quality"], {"fp8": {"method": "x"}}, "lacks quality.fp8.calibration_batches"),
    (["memory", "weight_bytes", "dit"], -1, "memory.weight_bytes.dit is -1"),
    (["created_by", "sources", "dit"], "ckpt", "created_by.sources.dit is 'ckpt', expected an object"),
    (["reference", "layout"], "sideways", "reference.layout is 'sideways'"),
    (["created_by", "source_quantization"], {"format": "nvfp4", "layout": "out_in", "quantized_linears": 1},
     "created_by.source_quantization.format is 'nvfp4', expected one of float8_e4m3fn-per-tensor"),
    (["created_by", "source_quantization"], {"format": "float8_e4m3fn-per-tensor", "layout": "out_in",
                                             "quantized_linears": 0}, "source_quantization.quantized_linears is 0"),
    (["components", "dit", "build", "device"], 0, "components.dit.build.device is 0, expected a string"),
    (["components", "dit", "build", "bucket_profiles"], [{"x": [[1]]}], "build.bucket_profiles[0] is"),
])
def test_bad_sections_are_one_line_with_the_fix(tiny_bundle: Path, path: list, value: object, word: str
                                               ) -> None:
    data = json.loads((tiny_bundle / MANIFEST_NAME).read_text())
    target = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(BundleError) as info:
        Manifest.from_json(data)
    message = str(info.value)
    assert word in message and "rebuild" in message and "\n" not in message, message


def test_tensorrt_build_facts_read_as_older_builds_wrote_them() -> None:
    """A TensorRT `build` record as builds wrote it (workspace null, keys the runtime never reads) loads
    typed, ignores unknown keys, and writes back the same JSON the C++ reader sees (its strings)."""
    written = {"tensorrt_version": "10.13.0", "gpu_name": "NVIDIA L40S", "compute_capability": "8.9",
               "precision": "fp16", "strongly_typed": False, "builder_flags": ["FP16"],
               "builder_optimization_level": 3, "workspace_bytes": None,
               "profiles": {"latent": [[1, 18, 128], [3, 18, 128], [3, 18, 128]]},
               "bucket_profiles": [{"latent": [[1, 18, 128], [3, 18, 128], [3, 18, 128]]}],
               "onnx_sha256": "0" * 64, "cache_key": "dit-fp16-trt10.13.0-sm89-x", "source": {"seeded": "ab"},
               "future_key": {"anything": 1}}
    facts = sc.BuildFacts.from_json(written, "components.dit.build")
    assert facts.compute_capability == "8.9" and facts.builder_flags == ("FP16",)
    assert facts.bucket_profiles[0]["latent"][2] == (3, 18, 128) and facts.workspace_bytes is None
    back = facts.to_json()
    assert back == {k: v for k, v in written.items() if k not in ("future_key", "workspace_bytes")}
    assert sc.BuildFacts.from_json(back, "build") == facts
    assert sc.BuildFacts.from_json({}, "build") == sc.BuildFacts()  # old bundles without one


def test_hf_tokenizer_needs_its_file() -> None:
    with pytest.raises(BundleError, match="tokenizer file"):
        sc.TextConfig.from_json({"tokenizer": "hf-tokenizers", "max_length": 8}, "text")
