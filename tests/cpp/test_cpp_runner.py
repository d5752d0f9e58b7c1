"""The C++ runner (`runtime/cpp`, `stdrc_run`) against the Python runtime on the same aoti bundle and inputs.

The one-stage runs use tests/conftest.py `aoti_two_stage_bundle` with `stages=1` (the path a one-stage bundle
takes, at 9x128x64 with the DiT's RoPE tables as inputs): one build serves these and the two-stage tests (each aoti
bundle is minutes of Inductor); the baked-RoPE DiT is the 2.3 case's (`aoti_tiny23_bundle`)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from stdrc.runtime.cpp_inputs import DECODE_NOISE, NOISE, read_cpp_outputs, run_python, write_cpp_inputs
from stdrc.runtime.options import GenerationOptions
from stdrc.runtime.pipeline import Pipeline

pytestmark = pytest.mark.slow  # the aoti bundles (shared with test_aoti.py) and a libtorch C++ build

FP32_ATOL = 1e-4
PROMPT, SEED = "a person waving", 11

# GenerationOptions fields -> the guidance paths they exercise
CASES = {
    "three-streams-batched": {"max_batch": 3},
    "two-streams-split-interval-rescale": {"ref_scale": 1.0, "guidance_interval": (0.3, 0.95), "cfg_rescale": 0.7,
                                           "max_batch": 1},
    "one-stream-distilled": {"ref_scale": 1.0, "text_scale": 1.0, "distilled": True, "max_batch": 3},
}


@pytest.fixture(scope="module")
def aoti_bundle(aoti_two_stage_bundle: Path) -> Path:
    """The bundle of the one-stage runs: every run here passes `stages=1` (ONE_STAGE)."""
    return aoti_two_stage_bundle


ONE_STAGE = {"stages": 1}  # the one-stage path on the shared two-stage bundle (its default is 2)


@pytest.fixture(scope="module")
def pipeline(aoti_bundle: Path) -> Pipeline:
    return Pipeline.from_bundle(aoti_bundle, trust_code=True)


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    return np.random.default_rng(3).integers(0, 256, (64, 96, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def default_inputs(pipeline: Pipeline, reference: np.ndarray, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_cpp_inputs(pipeline, reference, GenerationOptions(PROMPT, seed=SEED, face_crop=False, **ONE_STAGE),
                            tmp_path_factory.mktemp("cpp-inputs"))


def run_cpp(runner: Path, bundle: Path, inputs: Path, out: Path, *flags: str, trust: bool = True
            ) -> subprocess.CompletedProcess:
    """aoti bundles load a shared library: the runner refuses them without --trust-bundle-code (README, Trust)."""
    cmd = [str(runner), "--bundle", str(bundle), "--inputs", str(inputs), "--out", str(out), "--quiet", *flags,
           *(["--trust-bundle-code"] if trust else [])]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)


def test_cpp_runs_each_bucket_with_tiled_decode(cpp_runner: Path, aoti_tiled_buckets_bundle: Path,
                                               reference: np.ndarray, tmp_path: Path) -> None:
    """One dynamic-token aoti DiT (RoPE tables as inputs) and one decoder for every bucket, fed tiles of two
    widths: `--bucket` picks the size, and C++ places and blends the tiles as Python does."""
    multi = Pipeline.from_bundle(aoti_tiled_buckets_bundle, trust_code=True)
    assert [b.label() for b in multi.manifest.buckets] == ["9x192x64", "17x192x64"]
    assert multi.manifest.components["vae_decoder"].dynamic_dims == {"latent_frames": [2, 2, 3],
                                                                     "tile_width": [2, 3, 3]}
    for label, (frames, height, width) in (("9x192x64", (9, 64, 192)), ("17x192x64", (17, 64, 192))):
        options = GenerationOptions(PROMPT, seed=SEED, face_crop=False, steps=3, frames=frames, height=height,
                                    width=width)
        inputs = write_cpp_inputs(multi, reference, options, tmp_path / f"in-{label}")
        assert (inputs / "rope_cos.npy").is_file()
        python = run_python(multi, inputs)
        done = run_cpp(cpp_runner, aoti_tiled_buckets_bundle, inputs, tmp_path / f"out-{label}", "--bucket", label)
        assert done.returncode == 0, done.stderr
        cpp = read_cpp_outputs(tmp_path / f"out-{label}")
        assert cpp.video.shape == python.video.shape == (1, 3, frames, height, width)
        assert np.abs(cpp.latent - python.latent).max() <= FP32_ATOL
        assert np.abs(cpp.video - python.video).max() <= FP32_ATOL
    done = run_cpp(cpp_runner, aoti_tiled_buckets_bundle, inputs, tmp_path / "none", "--bucket", "25x192x64")
    assert done.returncode == 2 and "9x192x64, 17x192x64" in done.stderr, done.stderr
    assert not (tmp_path / "none").exists()


@pytest.mark.parametrize("case", list(CASES))
def test_cpp_matches_python(case: str, cpp_runner: Path, aoti_bundle: Path, pipeline: Pipeline,
                            reference: np.ndarray, tmp_path: Path) -> None:
    options = GenerationOptions(PROMPT, seed=SEED, face_crop=False, **ONE_STAGE, **CASES[case])
    max_batch = options.max_batch
    inputs = write_cpp_inputs(pipeline, reference, options, tmp_path / "inputs")
    python = run_python(pipeline, inputs, max_batch=max_batch)
    # the helper's inputs are generate()'s own draws: the comparison covers the real runtime path
    generated = pipeline.generate(reference, options)
    np.testing.assert_array_equal(python.latent, generated.latent)
    np.testing.assert_array_equal(python.frames, generated.frames)

    done = run_cpp(cpp_runner, aoti_bundle, inputs, tmp_path / "out", "--max-batch", str(max_batch))
    assert done.returncode == 0, done.stderr
    cpp = read_cpp_outputs(tmp_path / "out")
    assert cpp.stage1_latent is None and cpp.latent.shape == python.latent.shape == (1, 16, 128)  # 9x128x64: 2x2x4
    assert cpp.latent.dtype == np.float32
    assert cpp.video.shape == python.video.shape and cpp.frames.dtype == np.uint8
    assert np.abs(cpp.latent - python.latent).max() <= FP32_ATOL
    assert np.abs(cpp.video - python.video).max() <= FP32_ATOL
    assert np.abs(cpp.frames.astype(np.int16) - python.frames).max() <= 1  # uint8 rounding at a .5 boundary


def _decode_read(tool: Path, bundle: Path) -> dict:
    """What libstdrc reads from the bundle's manifest for the VAE decode (`stdrc_manifest`'s "decode")."""
    done = subprocess.run([str(tool), "--bundle", str(bundle)], check=False, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["decode"]


def test_cpp_matches_python_on_an_ltx23_bundle(cpp_runner: Path, cpp_manifest: Path, aoti_tiny23_bundle: Path,
                                               aoti_bundle: Path, reference: np.ndarray, tmp_path: Path) -> None:
    """tiny23 is LTX-2.3's kind: its DiT takes the stream's `sigma` (the prompt AdaLN), which the runner feeds at
    every step, and its VAE decoder has no timestep conditioning: the runner reads from the manifest no decode
    noise to mix and no timestep to feed (tiny's conditioned decoder: both), leaves a decode-noise file in the
    inputs unread, and its latent and video equal Python's on the same inputs."""
    pipe = Pipeline.from_bundle(aoti_tiny23_bundle, trust_code=True)
    assert pipe.feeds_sigma and pipe.manifest.components["dit"].inputs[-1].name == "sigma"
    assert [t.name for t in pipe.manifest.components["vae_decoder"].inputs] == ["latent"]
    assert _decode_read(cpp_manifest, aoti_tiny23_bundle) == {"noise_scale": None, "timestep": None}
    assert _decode_read(cpp_manifest, aoti_bundle) == {"noise_scale": pytest.approx(0.025),
                                                       "timestep": pytest.approx(0.05)}
    options = GenerationOptions(PROMPT, seed=SEED, face_crop=False, steps=3, max_batch=3)
    inputs = write_cpp_inputs(pipe, reference, options, tmp_path / "inputs")
    assert not (inputs / DECODE_NOISE).exists()  # Python draws none
    python = run_python(pipe, inputs)
    # a decode noise the runner must neither read nor mix: NaN would reach the video
    b = pipe.bucket
    np.save(inputs / DECODE_NOISE, np.full((1, python.latent.shape[-1], b.latent_frames, b.latent_height,
                                            b.latent_width), np.nan, np.float32))
    done = run_cpp(cpp_runner, aoti_tiny23_bundle, inputs, tmp_path / "out", "--max-batch", "3")
    assert done.returncode == 0, done.stderr
    cpp = read_cpp_outputs(tmp_path / "out")
    assert cpp.latent.shape == python.latent.shape and cpp.video.shape == python.video.shape
    assert np.abs(cpp.latent - python.latent).max() <= FP32_ATOL
    assert np.abs(cpp.video - python.video).max() <= FP32_ATOL


def test_cli_overrides_inputs(cpp_runner: Path, aoti_bundle: Path, pipeline: Pipeline, default_inputs: Path,
                              tmp_path: Path) -> None:
    sigmas = np.array([1.0, 0.7, 0.3, 0.0], np.float32)
    np.save(tmp_path / "sigmas.npy", sigmas)
    flags = ("--ref-scale", "1", "--text-scale", "1.5", "--sigmas", str(tmp_path / "sigmas.npy"))
    done = run_cpp(cpp_runner, aoti_bundle, default_inputs, tmp_path / "out", *flags)
    assert done.returncode == 0, done.stderr
    # the same run in Python: a copy of the inputs with those scales and sigmas written in
    (tmp_path / "in").mkdir()
    for f in default_inputs.iterdir():
        (tmp_path / "in" / f.name).write_bytes(f.read_bytes())
    meta = json.loads((default_inputs / "inputs.json").read_text())
    meta["guidance"].update(text_scale=1.5, ref_scale=1.0)
    (tmp_path / "in" / "inputs.json").write_text(json.dumps(meta))
    np.save(tmp_path / "in" / "sigmas.npy", sigmas)
    python = run_python(pipeline, tmp_path / "in")
    assert np.abs(read_cpp_outputs(tmp_path / "out").latent - python.latent).max() <= FP32_ATOL


def test_progress_is_one_line_per_step_in_a_log(cpp_runner: Path, aoti_bundle: Path, default_inputs: Path,
                                                tmp_path: Path) -> None:
    """stderr is a pipe here, not a terminal: plain `step i/N` lines, no carriage returns."""
    cmd = [str(cpp_runner), "--bundle", str(aoti_bundle), "--inputs", str(default_inputs), "--out", str(tmp_path / "o"),
           "--trust-bundle-code"]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stderr
    lines = done.stderr.strip().splitlines()
    steps = [line for line in lines if line.startswith("step ")]
    total = int(steps[0].split("/")[1])
    assert steps == [f"step {i}/{total}" for i in range(1, total + 1)]
    assert lines[-1].startswith("load ") and lines[-1].endswith(str(tmp_path / "o"))


def _linked_bundle(bundle: Path, dst: Path, manifest: dict | None = None, drop: str | None = None) -> Path:
    dst.mkdir()
    for f in bundle.iterdir():
        if f.name not in ("manifest.json", drop):
            os.link(f, dst / f.name)  # hard links: a symlink out of the bundle is refused
    data = manifest if manifest is not None else json.loads((bundle / "manifest.json").read_text())
    (dst / "manifest.json").write_text(json.dumps(data))
    return dst


def _bad_case(case: str, bundle: Path, inputs: Path, tmp: Path) -> tuple[Path, Path]:
    manifest = json.loads((bundle / "manifest.json").read_text())
    if case == "missing-bundle-folder":
        return tmp / "no-such-bundle", inputs
    if case == "missing-bundle-file":
        return _linked_bundle(bundle, tmp / "b", drop="vae_decoder.pt2"), inputs
    if case == "format-version":
        return _linked_bundle(bundle, tmp / "b", {**manifest, "format": 3}), inputs
    if case == "other-backend":
        manifest["components"]["dit"]["backend"] = "onnxruntime"
        return _linked_bundle(bundle, tmp / "b", manifest), inputs
    if case == "other-device":  # a .pt2 bakes its build device in
        manifest["components"]["dit"]["build"]["device"] = "cuda"
        return _linked_bundle(bundle, tmp / "b", manifest), inputs
    if case == "old-decode-tiling":  # equal tiles spread evenly: not ltx-core's placement
        manifest["decode"] = {"tile_height": 2, "tile_width": 2, "overlap": 1, "spatial_scale": 32}
        return _linked_bundle(bundle, tmp / "b", manifest), inputs
    edits = {"components-list": ("components", []), "file-null": ("file", None),
             "path-escape": ("file", "../outside.pt2"), "negative-sigma": ("sigmas", None)}
    if case in edits:
        key, value = edits[case]
        if key == "components":
            manifest["components"] = value
        elif key == "sigmas":
            manifest["sampler"]["sigmas"][1] = -1.0
        else:
            manifest["components"]["dit"][key] = value
        return _linked_bundle(bundle, tmp / "b", manifest), inputs
    copied = tmp / "in"
    copied.mkdir()
    for f in inputs.iterdir():
        (copied / f.name).write_bytes(f.read_bytes())
    noise = np.load(inputs / NOISE)
    if case == "noise-shape":
        np.save(copied / NOISE, noise[:, :5])
    elif case == "noise-dtype":
        np.save(copied / NOISE, noise.astype(np.int32))
    elif case == "noise-truncated":
        (copied / NOISE).write_bytes((inputs / NOISE).read_bytes()[:200])
    elif case == "noise-missing":
        (copied / NOISE).unlink()
    return bundle, copied


BAD = {
    "missing-bundle-folder": "does not exist",
    "missing-bundle-file": "vae_decoder.pt2 is missing",
    "format-version": "format 3 is not supported",
    "other-backend": "rebuild the bundle with --backend aoti",
    "other-device": "was exported for cuda, not cpu: rebuild the bundle on a cpu machine",
    "old-decode-tiling": "predate ltx-core's tile placement: rebuild it",
    "components-list": "components is [], expected an object",
    "file-null": "components.dit.file is null",
    "path-escape": "leaves the bundle folder",
    "negative-sigma": "sampler.sigmas",
    "untrusted": "--trust-bundle-code",
    "noise-shape": "noise.npy has shape [1, 5, 128], the bundle needs [1, 16, 128]",
    "noise-dtype": "holds int32 values, the runner needs float32",
    "noise-truncated": "truncated",
    "noise-missing": "noise.npy is missing",
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_nonzero(case: str, cpp_runner: Path, aoti_bundle: Path, default_inputs: Path,
                                           tmp_path: Path) -> None:
    bundle, inputs = _bad_case(case, aoti_bundle, default_inputs, tmp_path)
    done = run_cpp(cpp_runner, bundle, inputs, tmp_path / "out", trust=case != "untrusted")
    assert done.returncode > 0, f"exit {done.returncode} (a negative code is a crash): {done.stderr}"
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("stdrc_run: error: ") and BAD[case] in lines[0], lines[0]
    assert not (tmp_path / "out").exists()
