"""Shared fixtures: the tiny preset's models and bundles, built once per test session."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pytest

for _name in ("onnx_ir", "onnxscript", "torch.onnx"):
    logging.getLogger(_name).setLevel(logging.ERROR)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("stage-cache")


@pytest.fixture(scope="session")
def tiny_models():
    from stdrc.export.models import load_models

    return load_models("tiny")


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    from stdrc.export.build import BuildConfig, build_engines

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    return build_engines(BuildConfig(out=out, cache_dir=cache_dir, backend="onnxruntime", progress=False))


@pytest.fixture(scope="session")
def astronaut_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import skimage.data

    path = tmp_path_factory.mktemp("images") / "astronaut.png"
    cv2.imwrite(str(path), cv2.cvtColor(skimage.data.astronaut(), cv2.COLOR_RGB2BGR))
    return path


@pytest.fixture(scope="session")
def blank_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("images") / "blank.png"
    cv2.imwrite(str(path), np.full((256, 256, 3), 127, np.uint8))
    return path
