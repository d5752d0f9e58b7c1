"""The C++ manifest reader (`stdrc_manifest`) on hand-written manifests: the two-stage section, the buckets'
stage-1 grids and RoPE entries, the stage count a run takes, which TensorRT plans are refit at load, and the
refusals manifest.py makes."""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path

import pytest

from stdrc.engines.tensorrt import WEIGHT_STRIPPED_FLAGS
from stdrc.runtime.backends.tensorrt import WEIGHTLESS_FLAG, refit_onnx
from stdrc.runtime.manifest import ComponentEntry
from stdrc.runtime.schema import STAGE2_SIGMAS

pytestmark = pytest.mark.slow  # the libtorch C++ build (shared with the runner tests)

C, CONTEXT = 128, (8, 64)
SHA = "0" * 64


def _tensor(name: str, shape: list, dtype: str = "float32") -> dict:
    return {"name": name, "shape": shape, "dtype": dtype}


def _dit(rope: bool) -> dict:
    inputs = [_tensor("latent", ["batch", "tokens", C]), _tensor("timestep", ["batch", "tokens"]),
              _tensor("context", ["batch", *CONTEXT]), _tensor("context_mask", ["batch", CONTEXT[0]], "int64"),
              _tensor("attn_mask", ["batch", "tokens"], "int64")]
    if rope:
        inputs += [_tensor("rope_cos", [1, 2, "tokens", 16]), _tensor("rope_sin", [1, 2, "tokens", 16])]
    return {"backend": "aoti", "file": "dit.pt2", "sha256": SHA, "precision": "fp32", "inputs": inputs,
            "outputs": [_tensor("velocity", ["batch", "tokens", C])],
            "dynamic_dims": {"batch": [1, 3, 3], "tokens": [10, 40, 40]}, "build": {"device": "cpu"}}


def _bucket(frames: int, width: int, height: int, stage1: bool = True) -> dict:
    grid = [(frames - 1) // 8 + 1, height // 32, width // 32]
    label = f"{frames}x{width}x{height}"
    data = {"frames": frames, "height": height, "width": width, "text_length": CONTEXT[0], "fps": 24.0,
            "latent_grid": grid, "video_tokens": grid[0] * grid[1] * grid[2], "reference_tokens": grid[1] * grid[2],
            "rope": {"file": f"rope_{label}.npz", "sha256": SHA}}
    if stage1:
        data["stage1"] = {"rope": {"file": f"rope_s1_{label}.npz", "sha256": SHA}}
    return data


def manifest(two_stage: bool = True) -> dict:
    """A two-stage (or one-stage) manifest as the bundle writer lays it out, written by hand."""
    buckets = [_bucket(9, 128, 64, two_stage), _bucket(17, 256, 128, two_stage)]
    components = {"dit": _dit(rope=True), "vae_decoder": {
        "backend": "aoti", "file": "vae_decoder.pt2", "sha256": SHA, "precision": "fp32",
        "inputs": [_tensor("latent", [1, C, "latent_frames", "latent_height", "latent_width"])],
        "outputs": [_tensor("video", [1, 3, "frames", "height", "width"])]}}
    data = {"format": 2, "preset": "tiny", "bucket": buckets[0], "buckets": buckets, "components": components,
            "sampler": {"sigmas": [1.0, 0.6, 0.0], "distilled_sigmas": [1.0, 0.5, 0.0]},
            "guidance": {"text_scale": 3.0, "ref_scale": 2.0},
            "model_config": {"dit": {"in_channels": C}, "vae": {"timestep_conditioning": False,
                                                                 "decode_timestep": 0.05, "decode_noise_scale": 0.025}},
            "decode": {}}
    if two_stage:
        components["upsampler"] = {
            "backend": "aoti", "file": "upsampler.pt2", "sha256": SHA, "precision": "fp32",
            "inputs": [_tensor("latent", [1, C, "latent_frames", "stage1_height", "stage1_width"])],
            "outputs": [_tensor("upsampled", [1, C, "latent_frames", "height", "width"])]}
        components["dit_refine"] = {**_dit(rope=True), "file": "dit_refine.pt2"}
        data["two_stage"] = {"sigmas": list(STAGE2_SIGMAS), "default_stages": 2,
                             "lora": {"name": "refine.safetensors", "sha256": SHA, "strength": 0.8}}
    return data


def read(tool: Path, folder: Path, data: dict, *flags: str) -> subprocess.CompletedProcess:
    folder.mkdir(exist_ok=True)
    (folder / "manifest.json").write_text(json.dumps(data))
    return subprocess.run([str(tool), "--bundle", str(folder), *flags], check=False, capture_output=True, text=True,
                          timeout=60)


def assert_one_rebuild_line(done: subprocess.CompletedProcess, prefix: str, wanted: str) -> None:
    """A refused manifest: exit 2 and one stderr line starting with `prefix`, holding `wanted` and "rebuild"."""
    assert done.returncode == 2, done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix), lines
    assert wanted in lines[0] and "rebuild" in lines[0], lines[0]


def test_two_stage_default_samples_the_half_grid(cpp_manifest: Path, tmp_path: Path) -> None:
    done = read(cpp_manifest, tmp_path, manifest())
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["stages"] == 2
    assert out["two_stage"] == {"sigmas": pytest.approx(list(STAGE2_SIGMAS)), "default_stages": 2,
                                "lora": "refine.safetensors", "lora_strength": 0.8}
    assert out["bucket"]["label"] == "9x128x64" and out["bucket"]["rope"] == "rope_9x128x64.npz"
    half = out["sampling_grid"]
    assert half["label"] == "9x64x32" and half["latent_grid"] == [2, 1, 2]
    assert (half["video_tokens"], half["reference_tokens"]) == (4, 2)
    assert half["rope"] == "rope_s1_9x128x64.npz" and half["text_length"] == CONTEXT[0]
    assert sorted(out["components"]) == ["dit", "dit_refine", "upsampler", "vae_decoder"]


@pytest.mark.parametrize(("flags", "stages", "grid", "tokens"), [
    (("--stages", "1"), 1, "9x128x64", 2 * 2 * 4),
    (("--bucket", "17x256x128"), 2, "17x128x64", 3 * 2 * 4),
    (("--bucket", "17x256x128", "--stages", "1"), 1, "17x256x128", 3 * 4 * 8),
])
def test_stages_and_bucket_pick_the_grid(cpp_manifest: Path, tmp_path: Path, flags: tuple, stages: int, grid: str,
                                         tokens: int) -> None:
    done = read(cpp_manifest, tmp_path, manifest(), *flags)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert (out["stages"], out["sampling_grid"]["label"], out["sampling_grid"]["video_tokens"]) == (stages, grid,
                                                                                                    tokens)


def test_default_stages_and_one_stage_bundle(cpp_manifest: Path, tmp_path: Path) -> None:
    data = manifest()
    data["two_stage"]["default_stages"] = 1
    out = json.loads(read(cpp_manifest, tmp_path / "a", data).stdout)
    assert out["stages"] == 1 and out["sampling_grid"]["label"] == "9x128x64"
    del data["two_stage"]["default_stages"]  # the schema's default: 2
    assert json.loads(read(cpp_manifest, tmp_path / "b", data).stdout)["stages"] == 2
    one = read(cpp_manifest, tmp_path / "c", manifest(two_stage=False))
    assert one.returncode == 0, one.stderr
    assert json.loads(one.stdout)["stages"] == 1 and json.loads(one.stdout)["two_stage"] is None
    two = read(cpp_manifest, tmp_path / "d", manifest(two_stage=False), "--stages", "2")
    assert two.returncode == 2
    assert two.stderr.strip() == ("stdrc_manifest: error: --stages 2: this bundle is one-stage (no upsampler, "
                                  "no dit_refine): pass --stages 1, or rebuild it with --upsampler FILE "
                                  "--refine-lora FILE")


def _break(case: str) -> dict:
    data = copy.deepcopy(manifest(two_stage=case != "stage-component-without-section"))
    if case == "no-upsampler":
        del data["components"]["upsampler"]
    elif case == "no-refine":
        del data["components"]["dit_refine"]
    elif case == "stage-component-without-section":
        data["components"]["upsampler"] = copy.deepcopy(data["components"]["dit"])
    elif case == "bucket-not-64":
        data["buckets"][1] = _bucket(17, 224, 128)
    elif case == "no-stage1-rope":
        del data["buckets"][1]["stage1"]
    elif case == "stage1-rope-escapes":
        data["buckets"][0]["stage1"]["rope"]["file"] = "../rope.npz"
    elif case == "sigmas-not-to-zero":
        data["two_stage"]["sigmas"] = [0.9, 0.5, 0.1]
    elif case == "renoise-at-one":
        data["two_stage"]["sigmas"] = [1.0, 0.5, 0.0]
    elif case == "sigmas-increase":
        data["two_stage"]["sigmas"] = [0.5, 0.7, 0.0]
    elif case == "default-stages-3":
        data["two_stage"]["default_stages"] = 3
    elif case == "rope-baked":
        data["components"]["dit"] = _dit(rope=False)
    elif case == "section-not-object":
        data["two_stage"] = [0.9, 0.0]
    return data


BAD = {
    "no-upsampler": "two_stage section but no upsampler component",
    "no-refine": "two_stage section but no dit_refine component",
    "stage-component-without-section": "holds upsampler but no two_stage section",
    "bucket-not-64": "buckets[1] is 17x224x128 (FRAMESxWIDTHxHEIGHT): a two-stage bucket's width and height are "
                     "multiples of 64",
    "no-stage1-rope": "buckets[1] lacks stage1.rope",
    "stage1-rope-escapes": "leaves the bundle folder",
    "sigmas-not-to-zero": "sigmas from a re-noise level below 1 down to 0",
    "renoise-at-one": "sigmas from a re-noise level below 1 down to 0",
    "sigmas-increase": "non-increasing sigmas",
    "default-stages-3": "two_stage.default_stages is 3, expected 1 or 2",
    "rope-baked": "RoPE tables baked in",
    "section-not-object": "two_stage is [0.9,0.0], expected an object",
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_two_stage_manifest_is_one_line(case: str, cpp_manifest: Path, tmp_path: Path) -> None:
    """What manifest.py refuses in a two-stage manifest, C++ refuses too: one line naming the rebuild."""
    assert_one_rebuild_line(read(cpp_manifest, tmp_path, _break(case)), "stdrc_manifest: error: bundle manifest",
                            BAD[case])


def _tensorrt(data: dict, stripped: bool = True) -> dict:
    """`data` with its DiTs as TensorRT plans the way a two-stage TensorRT build writes them: REFIT + STRIP_PLAN
    (engines/tensorrt.py WEIGHT_STRIPPED_FLAGS), each listing the ONNX it is refit from and the shared weights."""
    data = copy.deepcopy(data)
    for name in ("dit", "dit_refine"):
        entry = data["components"][name]
        flags = ["FP16", *WEIGHT_STRIPPED_FLAGS] if stripped else ["FP16"]
        entry.update(backend="tensorrt", file=f"{name}.plan",
                     extra_files={f"{name}.onnx": SHA, "dit.onnx.data": SHA},
                     build={"tensorrt_version": "10.9.0", "compute_capability": "9.0", "builder_flags": flags})
    return data


def test_weight_stripped_plans_are_refit_from_their_onnx(cpp_manifest: Path, tmp_path: Path) -> None:
    """The reader keeps `build.builder_flags`: a plan built with STRIP_PLAN is refit from `<stem>.onnx`, the file
    runtime/backends/tensorrt.py refit_onnx names; a plan with its weights, or an aoti package, is not."""
    done = read(cpp_manifest, tmp_path / "a", _tensorrt(manifest()))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["refit"] == {"dit": "dit.onnx", "dit_refine": "dit_refine.onnx"}
    entry = ComponentEntry.from_json(_tensorrt(manifest())["components"]["dit_refine"], "dit_refine")
    assert refit_onnx(tmp_path / entry.file, entry).name == "dit_refine.onnx"  # the Python runtime's choice
    for folder, data in (("b", _tensorrt(manifest(), stripped=False)), ("c", manifest())):
        done = read(cpp_manifest, tmp_path / folder, data)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["refit"] == {}


def _break_refit(case: str) -> dict:
    data = _tensorrt(manifest())
    dit = data["components"]["dit"]
    if case == "no-refit-onnx":
        del dit["extra_files"]["dit.onnx"]
    elif case == "no-extra-files":
        del dit["extra_files"]
    elif case == "stripped-aoti":
        data = manifest()
        data["components"]["dit"]["build"]["builder_flags"] = list(WEIGHT_STRIPPED_FLAGS)
    elif case == "flags-not-list":
        dit["build"]["builder_flags"] = WEIGHTLESS_FLAG
    elif case == "flag-not-string":
        dit["build"]["builder_flags"] = ["REFIT", 3]
    return data


BAD_REFIT = {
    "no-refit-onnx": "dit.plan is built without its weights (STRIP_PLAN) and its entry lists no dit.onnx to refit it "
                     "from: rebuild the bundle",
    "no-extra-files": "lists no dit.onnx to refit it from",
    "stripped-aoti": "components.dit is marked STRIP_PLAN (weight-stripped) but its backend is aoti",
    "flags-not-list": "components.dit.build.builder_flags is \"STRIP_PLAN\", expected a list of flag names",
    "flag-not-string": "expected a list of flag names",
}


@pytest.mark.parametrize("case", list(BAD_REFIT))
def test_weight_stripped_plan_that_cannot_be_refit_is_refused(case: str, cpp_manifest: Path, tmp_path: Path) -> None:
    """A weight-stripped plan C++ could not refit is refused when the manifest is read, before any file is opened:
    run as it is, it would compute with no weights."""
    assert_one_rebuild_line(read(cpp_manifest, tmp_path, _break_refit(case)), "stdrc_manifest: error: ",
                            BAD_REFIT[case])


def test_runner_without_tensorrt_refuses_a_tensorrt_bundle(cpp_runner: Path, tmp_path: Path) -> None:
    """The CI build (no -DSTDRC_WITH_TENSORRT) opens no TensorRT plan, weight-stripped or not: one line naming the
    fix, exit 2, nothing written."""
    for stripped in (True, False):
        bundle = tmp_path / f"bundle-{stripped}"
        bundle.mkdir()
        (bundle / "manifest.json").write_text(json.dumps(_tensorrt(manifest(), stripped)))
        out = tmp_path / f"out-{stripped}"
        done = subprocess.run([str(cpp_runner), "--bundle", str(bundle), "--inputs", str(tmp_path), "--out", str(out),
                               "--trust-bundle-code"], check=False, capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, done.stderr
        assert done.stderr.strip() == ("stdrc_run: error: bundle component dit is a tensorrt engine; this runner "
                                       "takes aoti engines: rebuild the bundle with --backend aoti")
        assert not out.exists()


def _shared_constants(case: str) -> dict:
    """`manifest()` with `dit_refine` as a two-stage aoti build writes it (engines/aoti.py): a package without
    constants naming the dit package and its own constants file among its extra_files; `case` breaks that."""
    data = manifest()
    entry = data["components"]["dit_refine"]
    entry["extra_files"] = {"dit.pt2": SHA, "dit_refine.lora.safetensors": SHA}
    entry["build"] = {"device": "cpu", "constants_from": "dit.pt2", "constants_file": "dit_refine.lora.safetensors"}
    if case == "not-listed":
        del entry["extra_files"]["dit.pt2"]
    elif case == "no-file":
        del entry["build"]["constants_file"]
    elif case == "onnxruntime":
        entry.update(backend="onnxruntime", file="dit_refine.onnx")
    return data


@pytest.mark.parametrize("case", ["built", "not-listed", "no-file", "onnxruntime"])
def test_constants_given_at_load_are_listed_files_of_an_aoti_package(case: str, cpp_manifest: Path,
                                                                     tmp_path: Path) -> None:
    """Both readers take the facts as built and refuse, when the manifest is read, a constants file or base package
    outside the entry's extra_files (never hashed, never checked), one without the other, or on another backend."""
    from stdrc.runtime.errors import BundleError

    data = _shared_constants(case)
    done = read(cpp_manifest, tmp_path, data)
    entry = data["components"]["dit_refine"]
    if case == "built":
        assert done.returncode == 0, done.stderr
        facts = ComponentEntry.from_json(entry, "components.dit_refine").build
        assert (facts.constants_from, facts.constants_file) == ("dit.pt2", "dit_refine.lora.safetensors")
        return
    assert_one_rebuild_line(done, "stdrc_manifest: error: ", "components.dit_refine.build.constants_")
    with pytest.raises(BundleError, match="components.dit_refine.build is .* expected an aoti engine's constants_from"):
        ComponentEntry.from_json(entry, "components.dit_refine")
