"""The typed manifest: sections written and read through the same dataclasses, the manifest's sigmas
used by Python as by C++, one `rope_input`, old manifests still read."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from stdrc.runtime import manifest as mf
from stdrc.runtime import schema as sc
from stdrc.runtime.errors import BundleError
from stdrc.runtime.manifest import MANIFEST_NAME, Manifest, read_manifest, write_json_atomic
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


# manifests of real tiny builds (build-engines --backend onnxruntime: the default; two-stage, buckets 9x128x64 and
# 17x128x128, one LoRA at 0.5; 9x192x64 decoded in tiles) as main wrote them at 2bec9e3, before Bucket,
# ComponentEntry and DecodeTiling were sections
WRITTEN_BEFORE = sorted((Path(__file__).parent / "manifests").glob("*.json"))
DELETE = object()


def _sections() -> list[type]:
    found = {c for module in (sc, mf) for c in vars(module).values()
             if isinstance(c, type) and issubclass(c, sc.Section) and c is not sc.Section}
    assert {mf.Bucket, mf.TensorSpec, mf.ComponentEntry, sc.LoraEntry} <= found
    return [Manifest, *sorted(found, key=lambda c: c.__name__)]


def test_every_section_is_typed() -> None:
    """No section (or field of one) is an untyped dict: each value is read by a checking reader."""
    for cls in _sections():
        for f in dataclasses.fields(cls):
            assert "Any" not in str(f.type), (cls.__name__, f.name, f.type)
            assert cls is Manifest or "read" in f.metadata, (cls.__name__, f.name)


@pytest.mark.parametrize("path", WRITTEN_BEFORE, ids=lambda p: p.stem)
def test_manifests_written_before_write_back_byte_for_byte(path: Path, tmp_path: Path) -> None:
    """A manifest an earlier stdrc wrote, read and written back as BundleWriter writes it: the same bytes."""
    m = Manifest.from_json(json.loads(path.read_text()))
    write_json_atomic(tmp_path / MANIFEST_NAME, m.to_json())
    assert (tmp_path / MANIFEST_NAME).read_bytes() == path.read_bytes()
    assert Manifest.from_json(json.loads(path.read_text())) == m


def test_written_before_cover_every_written_part() -> None:
    """The files above hold what the byte test must cover: per-bucket and stage-1 RoPE files, a LoRA, two stages,
    dynamic dims, extra files and decode tiles."""
    assert [p.name for p in WRITTEN_BEFORE] == ["tiny-tiled-decode.json", "tiny-two-stage-two-buckets-lora.json",
                                                 "tiny.json"]
    assert Manifest.from_json(json.loads(WRITTEN_BEFORE[0].read_text())).decode is not None
    two = Manifest.from_json(json.loads(WRITTEN_BEFORE[1].read_text()))
    assert len(two.buckets) == 2 and all(b.rope and b.stage1 for b in two.buckets)
    assert two.loras and two.two_stage and two.components["dit"].dynamic_dims["tokens"]
    assert two.components["dit"].extra_files and two.components["dit"].build.source


def test_written_manifest_is_the_typed_one(tiny_bundle: Path, tmp_path: Path) -> None:
    """The file on disk is exactly what the dataclasses write, and reads back equal (one field list)."""
    text = (tiny_bundle / MANIFEST_NAME).read_text()
    data = json.loads(text)
    m = Manifest.from_json(data)
    write_json_atomic(tmp_path / MANIFEST_NAME, m.to_json())
    assert (tmp_path / MANIFEST_NAME).read_text() == text
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
    (["components", "dit", "inputs"], [], "components.dit.inputs is [], expected a non-empty list of TensorSpec"),
    (["components", "dit", "inputs", 0, "dtype"], "float64", "components.dit.inputs[0].dtype is 'float64'"),
    (["components", "dit", "inputs", 0, "shape"], [-1], "components.dit.inputs[0].shape is [-1]"),
    (["components", "dit", "outputs", 0, "name"], DELETE, "lacks components.dit.outputs[0].name"),
    (["components", "dit", "dynamic_dims", "batch"], [3, 1, 1], "components.dit.dynamic_dims.batch is [3, 1, 1]"),
    (["components", "dit", "backend"], "onnx", "components.dit.backend is 'onnx', expected one of"),
    (["components", "dit", "precision"], "fp4", "components.dit.precision is 'fp4', expected one of"),
    (["components", "dit", "sha256"], DELETE, "lacks components.dit.sha256"),
    (["buckets", 0, "frames"], 10, "bundle manifest buckets[0]: frames=10 is not 8k+1"),
    (["buckets", 0, "fps"], DELETE, "lacks buckets[0].fps"),
    (["buckets", 0, "width"], "64", "buckets[0].width is '64', expected an integer >= 1"),
    (["buckets", 0, "video_tokens"], 5, "buckets[0].video_tokens is 5, expected 12 for this bucket"),
    (["buckets", 0, "latent_grid"], [1, 1, 1], "buckets[0].latent_grid is [1, 1, 1], expected [2, 2, 3]"),
    (["buckets", 0, "rope"], {"file": "/rope.npz", "sha256": "0" * 64}, "buckets[0].rope.file is '/rope.npz'"),
    (["buckets", 0, "stage1"], {"rope": 1}, "buckets[0].stage1.rope is 1, expected an object"),
    (["bucket"], {"frames": 9, "height": 96, "width": 96, "text_length": 16, "fps": 24.0},
     "bucket is '9x96x96', expected the first of buckets (9x96x64)"),
    (["loras"], {}, "loras is {}, expected a list"),
    (["decode"], {"placement": "ltx-core", "tile": 0, "overlap": 0, "spatial_scale": 32},
     "decode.tile is 0, expected an integer >= 1"),
    (["decode"], {"tile": 4, "overlap": 1, "spatial_scale": 32}, "predate ltx-core's tile placement"),
    (["loras"], [{"name": "a", "sha256": "xyz", "strength": 1}], "loras[0].sha256 is 'xyz', expected a sha256"),
    (["loras"], [{"name": "a", "sha256": "0" * 64}], "lacks loras[0].strength"),
])
def test_bad_sections_are_one_line_with_the_fix(tiny_bundle: Path, path: list, value: object, word: str
                                               ) -> None:
    data = json.loads((tiny_bundle / MANIFEST_NAME).read_text())
    target = data
    for key in path[:-1]:
        target = target[key]
    if value is DELETE:
        del target[path[-1]]
    else:
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


def test_a_section_built_in_python_with_lists_writes_json() -> None:
    """Lists where the fields say tuples (a caller's shapes) are written as the JSON lists they are."""
    entry = mf.ComponentEntry("onnxruntime", "a.onnx", "0" * 64, "fp32", [mf.TensorSpec("x", [1, "batch"], "float32")],
                              (mf.TensorSpec("y", (2,), "int64"),), {"batch": [1, 2, 3]})
    data = json.loads(json.dumps(entry.to_json()))
    assert data["inputs"] == [{"name": "x", "shape": [1, "batch"], "dtype": "float32"}]
    assert mf.ComponentEntry.from_json(data, "components.x").inputs == (mf.TensorSpec("x", (1, "batch"), "float32"),)
