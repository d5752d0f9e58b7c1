"""`write_cpp_inputs` and `run_python` with two stages, on the shared tiny two-stage bundle (ONNX Runtime): the
folder holds both stages' draws at their grids, and `run_python` on it equals `Pipeline.generate` (the C++ side of
the comparison: tests/cpp/test_cpp_two_stage.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from stdrc.runtime.cpp_inputs import NOISE, REFERENCE, STAGE2_NOISE, STAGE2_REFERENCE, run_python, write_cpp_inputs
from stdrc.runtime.options import GenerationOptions
from stdrc.runtime.pipeline import Pipeline

PROMPT, SEED = "a man laughing", 7


@pytest.fixture(scope="module")
def pipe(two_stage_bundle: Path) -> Pipeline:
    return Pipeline.from_bundle(two_stage_bundle, prompt_cache=None)


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    return np.random.default_rng(2).integers(0, 256, (72, 100, 3), dtype=np.uint8)


def test_two_stage_inputs_are_generates_own_draws(pipe: Pipeline, reference: np.ndarray, tmp_path: Path) -> None:
    options = GenerationOptions(PROMPT, seed=SEED, steps=2, face_crop=False)  # stages: the bundle's, 2
    folder = write_cpp_inputs(pipe, reference, options, tmp_path / "in")
    b, c = pipe.manifest.bucket, pipe.manifest.model_config.dit.in_channels
    h = b.half()
    assert json.loads((folder / "inputs.json").read_text())["stages"] == 2
    shapes = {NOISE: (1, h.video_tokens, c), REFERENCE: (1, h.reference_tokens, c),
              STAGE2_NOISE: (1, b.video_tokens, c), STAGE2_REFERENCE: (1, b.reference_tokens, c)}
    assert {name: np.load(folder / name).shape for name in shapes} == shapes
    assert h.tokens in np.load(folder / "rope_cos.npy").shape  # the tables of each stage's grid
    assert b.tokens in np.load(folder / "stage2_rope_cos.npy").shape
    python = run_python(pipe, folder)
    generated = pipe.generate(reference, options)
    np.testing.assert_array_equal(python.latent, generated.latent)
    np.testing.assert_array_equal(python.frames, generated.frames)
    assert python.stage1_latent.shape == (1, h.video_tokens, c)


def test_one_stage_inputs_on_a_two_stage_bundle(pipe: Pipeline, reference: np.ndarray, tmp_path: Path) -> None:
    options = GenerationOptions(PROMPT, seed=SEED, steps=2, face_crop=False, stages=1)
    folder = write_cpp_inputs(pipe, reference, options, tmp_path / "in")
    b = pipe.manifest.bucket
    assert json.loads((folder / "inputs.json").read_text())["stages"] == 1
    assert np.load(folder / NOISE).shape[1] == b.video_tokens and not (folder / STAGE2_NOISE).exists()
    python = run_python(pipe, folder)
    np.testing.assert_array_equal(python.latent, pipe.generate(reference, options).latent)
    assert python.stage1_latent is None
