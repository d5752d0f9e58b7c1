"""The C++ runner's two-stage path (`stdrc_run`, stages 2 and 1) against the Python runtime on the same aoti
bundle and inputs: tests/conftest.py `aoti_two_stage_bundle`, as build-engines makes it (a real refinement: the
seeded LoRA at strength 1, `dit_refine` given the dit package's constants at load; in C++ the loaded dit engine's)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from test_cpp_runner import FP32_ATOL, PROMPT, SEED, run_cpp

from stdrc.runtime.cpp_inputs import STAGE2_NOISE, read_cpp_outputs, run_python, write_cpp_inputs
from stdrc.runtime.options import GenerationOptions
from stdrc.runtime.pipeline import Pipeline

pytestmark = pytest.mark.slow  # an aoti bundle (minutes of Inductor) and the libtorch C++ build


@pytest.fixture(scope="module")
def pipeline(aoti_two_stage_bundle: Path) -> Pipeline:
    return Pipeline.from_bundle(aoti_two_stage_bundle, trust_code=True)


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    return np.random.default_rng(5).integers(0, 256, (80, 120, 3), dtype=np.uint8)


def _close(cpp, python) -> None:
    assert cpp.latent.shape == python.latent.shape and cpp.video.shape == python.video.shape
    assert np.abs(cpp.latent - python.latent).max() <= FP32_ATOL
    assert np.abs(cpp.video - python.video).max() <= FP32_ATOL
    assert np.abs(cpp.frames.astype(np.int16) - python.frames).max() <= 1  # uint8 rounding at a .5 boundary


def test_two_stages_match_python(cpp_runner: Path, aoti_two_stage_bundle: Path, pipeline: Pipeline,
                                 reference: np.ndarray, tmp_path: Path) -> None:
    """The bundle's default (2): half-grid guided sampling, upsampler, re-noise, refinement, decode at 9x128x64."""
    options = GenerationOptions(PROMPT, seed=SEED, face_crop=False, steps=3)
    inputs = write_cpp_inputs(pipeline, reference, options, tmp_path / "inputs")
    assert json.loads((inputs / "inputs.json").read_text())["stages"] == 2
    assert np.load(inputs / "noise.npy").shape == (1, 2 * 1 * 2, 128)  # the half grid 9x64x32
    assert np.load(inputs / STAGE2_NOISE).shape == (1, 2 * 2 * 4, 128)
    python = run_python(pipeline, inputs)
    generated = pipeline.generate(reference, options)  # the folder holds generate()'s own draws
    np.testing.assert_array_equal(python.latent, generated.latent)
    np.testing.assert_array_equal(python.frames, generated.frames)

    cmd = [str(cpp_runner), "--bundle", str(aoti_two_stage_bundle), "--inputs", str(inputs), "--out",
           str(tmp_path / "out"), "--trust-bundle-code"]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    cpp = read_cpp_outputs(tmp_path / "out")
    assert cpp.video.shape == (1, 3, 9, 64, 128)
    assert cpp.stage1_latent.shape == python.stage1_latent.shape == (1, 4, 128)
    assert np.abs(cpp.stage1_latent - python.stage1_latent).max() <= FP32_ATOL
    _close(cpp, python)
    steps = [line for line in done.stderr.splitlines() if line.startswith("step ")]
    assert steps == [f"step {i}/6 stage 1/2 (half size)" for i in (1, 2, 3)] + \
        [f"step {i}/6 stage 2/2 (refine)" for i in (4, 5, 6)]

    refused = run_cpp(cpp_runner, aoti_two_stage_bundle, inputs, tmp_path / "none", "--stages", "1")
    assert refused.returncode == 2 and not (tmp_path / "none").exists()
    assert refused.stderr.strip().splitlines() == [
        f"stdrc_run: error: --stages 1: the inputs in {inputs} were written for 2 stage(s); pass --stages 2 or "
        "write them with GenerationOptions(stages=1)"]


def test_one_stage_on_a_two_stage_bundle_matches_python(cpp_runner: Path, aoti_two_stage_bundle: Path,
                                                        pipeline: Pipeline, reference: np.ndarray,
                                                        tmp_path: Path) -> None:
    """`--stages 1`: today's path at the output bucket with `dit`, no stage-2 inputs read."""
    options = GenerationOptions(PROMPT, seed=SEED, face_crop=False, steps=3, stages=1)
    inputs = write_cpp_inputs(pipeline, reference, options, tmp_path / "inputs")
    assert not (inputs / STAGE2_NOISE).exists()
    python = run_python(pipeline, inputs)
    np.testing.assert_array_equal(python.latent, pipeline.generate(reference, options).latent)
    done = run_cpp(cpp_runner, aoti_two_stage_bundle, inputs, tmp_path / "out", "--stages", "1")
    assert done.returncode == 0, done.stderr
    cpp = read_cpp_outputs(tmp_path / "out")
    assert cpp.stage1_latent is None and python.stage1_latent is None
    _close(cpp, python)
