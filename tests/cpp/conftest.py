"""Fixtures for the C++ runtime tests: the tiny aoti bundle and the `stdrc_run` binary, once per session."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

CPP_DIR = Path(__file__).resolve().parents[2] / "runtime" / "cpp"
JSON_HEADER_DIRS = (Path("/usr/include"), Path("/usr/local/include"))


def build_aoti_bundle(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    """The tiny preset as aoti packages, built once per session (shared with tests/engines/test_aoti.py)."""
    from stdrc.engines.build import BuildConfig, build_engines

    out = tmp_path_factory.getbasetemp() / "aoti-bundle" / "tiny"
    if not (out / "manifest.json").is_file():  # BundleWriter renames the folder into place only when complete
        build_engines(BuildConfig(out=out, cache_dir=cache_dir, backend="aoti", progress=False))
    return out


@pytest.fixture(scope="session")
def aoti_tiled_buckets_bundle(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    """The tiny preset as aoti packages for two buckets of different frame counts at 64x192, decoded in 96 px
    tiles (32 px overlap: columns [0,3) [2,5) [4,6), two widths): one DiT with dynamic tokens, one decoder with
    dynamic latent frames and tile width. One build serves the tiling and the bucket tests (each aoti build is
    minutes of Inductor). (With frames, tile height and tile width all dynamic, Inductor fails to lower the
    decoder's reflect padding: torch 2.13, measured; the build refuses that mix.)"""
    from stdrc.engines.build import BuildConfig, build_engines

    out = tmp_path_factory.mktemp("aoti-tiled-buckets") / "tiny-tiled-buckets"
    return build_engines(BuildConfig(out=out, cache_dir=cache_dir, backend="aoti", buckets=("9x192x64", "17x192x64"),
                                     decode_tile=96, decode_overlap=32, progress=False))


@pytest.fixture(scope="session")
def aoti_bundle(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    return build_aoti_bundle(tmp_path_factory, cache_dir)


def _missing_tools() -> str | None:
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install -y cmake g++)"
    if not any((d / "nlohmann" / "json.hpp").is_file() for d in JSON_HEADER_DIRS):
        return "nlohmann-json headers are missing (apt-get install -y nlohmann-json3-dev)"
    return None


ALLOW_SKIP = "STDRC_ALLOW_SKIP_CPP"  # =1: skip (not fail) the C++ tests where cmake/g++/nlohmann-json are missing


@pytest.fixture(scope="session")
def cpp_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """libstdrc + tools built with CMake against the torch wheel's libtorch. STDRC_CPP_BUILD=DIR reuses a folder.

    Missing build tools fail the tests, unless STDRC_ALLOW_SKIP_CPP=1 says a machine without them may skip.
    """
    reason = _missing_tools()
    if reason:
        if os.environ.get(ALLOW_SKIP) == "1":
            pytest.skip(f"C++ runtime not built ({ALLOW_SKIP}=1): {reason}")
        pytest.fail(f"C++ runtime cannot be built: {reason}; or set {ALLOW_SKIP}=1 to skip the C++ tests")
    import torch

    build = Path(os.environ.get("STDRC_CPP_BUILD") or tmp_path_factory.mktemp("cpp-build"))
    configure = ["cmake", "-S", str(CPP_DIR), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                 f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}", f"-DPython_EXECUTABLE={sys.executable}"]
    start = time.perf_counter()
    for cmd in (configure, ["cmake", "--build", str(build), "-j", "2"]):
        done = subprocess.run(cmd, check=False, capture_output=True, text=True)
        if done.returncode != 0:
            pytest.fail(f"{' '.join(cmd[:2])} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    print(f"C++ runtime built in {time.perf_counter() - start:.1f} s")
    return build


@pytest.fixture(scope="session")
def cpp_runner(cpp_build: Path) -> Path:
    return cpp_build / "stdrc_run"


@pytest.fixture(scope="session")
def cpp_tiles(cpp_build: Path) -> Path:
    return cpp_build / "stdrc_tiles"


@pytest.fixture(scope="session")
def cpp_manifest(cpp_build: Path) -> Path:
    return cpp_build / "stdrc_manifest"


TWO_STAGE_BUCKETS = ("9x128x64", "9x64x32")  # an output bucket and its stage-1 half


@pytest.fixture(scope="session")
def aoti_two_stage_bundle(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    """A two-stage aoti bundle assembled from real engines, since aoti has no refinement engine (engines/refine.py
    builds `dit_refine` on ONNX Runtime and TensorRT only) and the C++ runner runs aoti packages.

    The tiny preset built for 9x128x64 and its half 9x64x32 (one DiT with dynamic tokens for both grids, one VAE
    encoder for both sizes), an aoti `upsampler` built by `build_component` as build-engines builds it, and
    `dit_refine` pointed at the dit package: the refinement with a LoRA of strength 0. Its one bucket is 9x128x64
    with the half's RoPE tables as its stage-1 entry. Python and C++ then run the same engines, so their
    comparison covers the two-stage algorithm (half grid, upsampler, re-noise, refinement, decode)."""
    from stdrc.engines.build import BuildConfig, build_component, build_engines
    from stdrc.engines.bundle import BundleWriter
    from stdrc.export.config import get_preset
    from stdrc.export.models import plan_sources
    from stdrc.export.specs import component_specs
    from stdrc.runtime.manifest import Bucket, Manifest
    from stdrc.runtime.schema import LoraEntry, TwoStageConfig

    root = tmp_path_factory.mktemp("aoti-two-stage")
    base = build_engines(BuildConfig(out=root / "base", cache_dir=cache_dir, backend="aoti", buckets=TWO_STAGE_BUCKETS,
                                     progress=False))
    manifest = Manifest.from_json(json.loads((base / "manifest.json").read_text()))
    out, (bucket, half) = root / "tiny-two-stage", manifest.buckets
    shutil.copytree(base, out)
    preset = get_preset("tiny")
    cfg = BuildConfig(out=root / "upsampler", cache_dir=cache_dir, backend="aoti", progress=False, two_stage=True)
    spec = component_specs(preset, (bucket,), rope_input=True, two_stage=True)["upsampler"]
    with BundleWriter(cfg.out) as writer:
        upsampler = build_component(cfg, "aoti", plan_sources(preset, two_stage=True), bucket, spec, writer,
                                    full=lambda: None)
        shutil.copy2(writer.path(upsampler.file), out / upsampler.file)
    b = Bucket(bucket.frames, bucket.height, bucket.width, bucket.text_length, bucket.fps, rope_file=bucket.rope_file,
               rope_sha256=bucket.rope_sha256, stage1_rope_file=half.rope_file, stage1_rope_sha256=half.rope_sha256)
    data = manifest.to_json()
    data.update(bucket=b.to_json(), buckets=[b.to_json()],
                two_stage=TwoStageConfig(lora=LoraEntry("strength-0.safetensors", "0" * 64, 0.0)).to_json())
    data["components"].update(upsampler=upsampler.to_json(), dit_refine=data["components"]["dit"])
    Manifest.from_json(data)  # what the Python runtime reads, checked before anything runs on it
    (out / "manifest.json").write_text(json.dumps(data, indent=2))
    return out
