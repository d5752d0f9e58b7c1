"""A Lightricks-style pre-quantized FP8 checkpoint (benchmarks/synthetic.py, tiny width, each family) as build
input: built to fp32 ONNX Runtime by dequantising as read, verified, generating, and within FP8's quantisation
error of the bf16 file it was quantized from."""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import pytest
import torch
from bench import bench_module  # tests/bench.py

from stdrc.calibration.capture import random_dit_batches
from stdrc.export.checkpoint import open_checkpoint
from stdrc.export.config import get_preset
from stdrc.export.models import load_models
from stdrc.runtime.manifest import Bucket, read_manifest

# e4m3 rounds to 3 mantissa bits: a relative error uniform within +-2^-4 at most, rms 2^-4 / sqrt(3) per
# weight. Each quantized Linear's output is then off by at most that rms fraction (independent rounding
# errors), and the video DiT's output by at most the quadrature sum over its quantized Linears (each
# controls at most the whole output). The measured errors are ~100x smaller (4e-4 tiny, 2e-4 tiny23):
# block 0 stays bf16 and a quantized block's residual update is a fraction of the output.
E4M3_RMS = 2.0**-4 / math.sqrt(3)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    synthetic = bench_module("synthetic")
    folder, out = tmp_path_factory.mktemp("fp8build"), {}
    for name in ("tiny", "tiny23"):
        bf16 = synthetic.write_checkpoint(folder / f"{name}.safetensors", get_preset(name), 2)
        out[name] = bf16, synthetic.write_fp8_checkpoint(bf16, folder / f"{name}-fp8.safetensors")
    return out


@pytest.mark.parametrize("name", ["tiny", "tiny23"])
def test_fp8_file_builds_verifies_generates(files, name: str, tmp_path: Path, cache_dir: Path,
                                            astronaut_png: Path, capsys) -> None:
    from stdrc.cli import main as runtime_main
    from stdrc.engines.cli import main

    bf16, fp8 = files[name]
    bundle = tmp_path / "bundle"
    assert main(["build-engines", "--preset", name, "--checkpoint", str(fp8), "--backend", "onnxruntime",
                 "--out", str(bundle), "--cache-dir", str(cache_dir), "-q"]) == 0
    manifest = read_manifest(bundle)
    source = open_checkpoint(fp8, sha256="-").fp8
    recorded = manifest.created_by.source_quantization
    assert recorded is not None and recorded.to_json() == source.record()
    assert recorded.format == "float8_e4m3fn-per-tensor" and recorded.layout == "out_in"
    assert json.loads(recorded.metadata)["quantization"]["quant_algo"] == "FP8"
    assert manifest.components["dit"].precision == "fp32"
    capsys.readouterr()
    assert main(["verify", str(bundle), "--checkpoint", str(fp8), "--json"]) == 0  # engines == dequantised
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and set(report["components"]) == set(manifest.components)
    out = tmp_path / "out.mp4"
    assert runtime_main(["generate", "--bundle", str(bundle), "--ref", str(astronaut_png), "--prompt",
                         "a woman smiles", "--steps", "2", "-o", str(out)]) == 0
    video = cv2.VideoCapture(str(out))
    assert int(video.get(cv2.CAP_PROP_FRAME_COUNT)) == manifest.buckets[0].frames
    video.release()

    # the dequantised DiT against the bf16 file's, on the same inputs
    quantized = open_checkpoint(fp8, sha256="-").linear_scales("dit")
    ours = load_models(name, checkpoint=fp8, components=("dit",))
    ref = load_models(name, checkpoint=bf16, components=("dit",)).dit
    bucket = Bucket(frames=9, height=64, width=64, text_length=ours.preset.default_bucket["text_length"])
    bound = E4M3_RMS * math.sqrt(len(quantized))
    for feeds in random_dit_batches(ours.preset, bucket, n=2, seed=0):
        with torch.no_grad():
            a, b = ours.dit(**feeds), ref(**feeds)
        err = float((a - b).norm() / b.norm())
        assert 0 < err <= bound, (err, bound)
