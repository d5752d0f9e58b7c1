"""`build-engines --precision fp8` on a pre-quantized FP8 checkpoint (benchmarks/synthetic.py's Lightricks-style
files, tiny width, each family): the file's own scales and layer list, no calibration, for the torch fast path
(run here on CPU: `torch._scaled_mm` runs on CPU in this torch) and the TensorRT Q/DQ ONNX (run here through ONNX
Runtime's CPU FP8 Q/DQ; no TensorRT build); `verify` against ltx-core's fp8_scaled_mm arithmetic on the same
file; LoRAs requantised as ltx-core does; a file quantized another way refused from its header."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from bench import bench_module  # tests/bench.py
from refusals import assert_build_refused_before_any_read  # tests/refusals.py
from safetensors import safe_open
from safetensors.torch import save_file

from stdrc.calibration.fp8 import rel_l2
from stdrc.export.checkpoint import open_checkpoint
from stdrc.export.config import get_preset
from stdrc.export.fp8_scaled import file_scales
from stdrc.runtime.manifest import Bucket, read_manifest

QUANTIZED = "transformer_blocks.1.attn1.to_q"  # block 1: quantized by ltx-core's policy in both families


@pytest.fixture(scope="module")
def synthetic():
    return bench_module("synthetic")


@pytest.fixture(scope="module")
def fp8_files(synthetic, tmp_path_factory: pytest.TempPathFactory):
    """name -> its FP8 file, written on first use."""
    folder, made = tmp_path_factory.mktemp("fp8scales"), {}

    def get(name: str) -> Path:
        if name not in made:
            bf16 = synthetic.write_checkpoint(folder / f"{name}.safetensors", get_preset(name), 2)
            made[name] = synthetic.write_fp8_checkpoint(bf16, folder / f"{name}-fp8.safetensors")
        return made[name]
    return get


def _lora(path: Path, name: str) -> Path:
    from stdrc.export.lora import dit_shapes

    rows, cols = dit_shapes(get_preset(name).dit)[f"{QUANTIZED}.weight"]
    gen = torch.Generator().manual_seed(1)
    save_file({f"diffusion_model.{QUANTIZED}.lora_A.weight": torch.randn(4, cols, generator=gen) * 0.2,
               f"diffusion_model.{QUANTIZED}.lora_B.weight": torch.randn(rows, 4, generator=gen) * 0.2}, str(path))
    return path


def test_another_quantization_is_refused_for_fp8_engines(fp8_files, tmp_path, monkeypatch, capsys):
    with safe_open(str(fp8_files("tiny")), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    meta["_quantization_metadata"] = json.dumps({"quantization": {"quant_algo": "NVFP4"}})
    bad = tmp_path / "nvfp4.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    assert_build_refused_before_any_read(bad, tmp_path, r"quantized as NVFP4 .*--calibrate-fp8", monkeypatch, capsys,
                                         args=("--backend", "torch", "--precision", "fp8"))


@pytest.mark.slow  # a torch.export bundle per family (and a LoRA fused on tiny23): ~1 min on 2 CPU cores
@pytest.mark.parametrize("name,lora", [("tiny", False), ("tiny23", True)])
def test_torch_fp8_build_takes_the_files_scales(fp8_files, name: str, lora: bool, tmp_path: Path, cache_dir: Path,
                                                astronaut_png: Path, capsys) -> None:
    from stdrc.engines.cli import main
    from stdrc.engines.verify import FP8_FILE_TOLERANCE
    from stdrc.runtime.pipeline import Pipeline

    fp8 = fp8_files(name)
    loras = ["--lora", str(_lora(tmp_path / "lora.safetensors", name))] if lora else []
    bundle = tmp_path / "bundle"
    assert main(["build-engines", "--preset", name, "--checkpoint", str(fp8), "--backend", "torch", "--precision",
                 "fp8", *loras, "--out", str(bundle), "--cache-dir", str(cache_dir), "-q"]) == 0
    manifest = read_manifest(bundle)
    quality = manifest.quality.fp8
    assert manifest.components["dit"].precision == "fp8"
    assert quality.scales_source == "checkpoint" and quality.calibration_batches == 0  # no modelopt run
    assert 0 < quality.dit_rel_l2_held_out < 0.1 and quality.frame_psnr_db_held_out > 25
    written = json.loads((bundle / quality.scales_file).read_text())
    linears = open_checkpoint(fp8, sha256="-").linear_scales("dit")
    files = file_scales(linears)
    assert set(written) == set(files) and len(written) == 2 * len(linears)
    changed = {k for k in written if written[k] != files[k]}
    assert changed == ({f"ltx.{QUANTIZED}.weight_scale"} if lora else set())  # requantised after the LoRA
    capsys.readouterr()
    assert main(["verify", str(bundle), "--checkpoint", str(fp8), *loras, "--trust-bundle-code", "--json"]) == 0
    dit = json.loads(capsys.readouterr().out)["components"]["dit"]
    assert dit["tolerance"] == FP8_FILE_TOLERANCE and 1e-4 < dit["rel_l2"] <= FP8_FILE_TOLERANCE  # bf16 remains
    result = Pipeline.from_bundle(bundle, trust_code=True).generate(astronaut_png, prompt="a woman smiles", seed=2,
                                                                    steps=2)
    assert result.frames.shape[0] == manifest.buckets[0].frames and np.isfinite(result.frames).all()


@pytest.mark.slow  # a Q/DQ export of the tiny23 DiT: ~30 s
def test_tensorrt_qdq_onnx_takes_the_files_scales(fp8_files, tmp_path: Path) -> None:
    """What a TensorRT build of the FP8 file compiles: the file's codes as FP8 initializers, its input scales in
    QuantizeLinear; run through ONNX Runtime, equal to the fp8_scaled_mm emulation within fp32 rounding."""
    from stdrc.engines.build import BuildConfig, file_qdq_onnx
    from stdrc.export.dit import BakedRopeDiT
    from stdrc.export.fp8_scaled import scaled_fp8_dit
    from stdrc.export.models import load_models
    from stdrc.export.specs import component_specs

    fp8 = fp8_files("tiny23")
    models = load_models("tiny23", checkpoint=fp8, components=("dit",))
    bucket = Bucket(**models.preset.default_bucket)
    spec = component_specs(models.preset, bucket)["dit"]
    linears = open_checkpoint(fp8, sha256="-").linear_scales("dit")
    scales = file_scales(linears)
    path = file_qdq_onnx(BuildConfig(preset="tiny23"), models, bucket, spec, scales, tmp_path)
    model = onnx.load(str(path))
    fp8_weights = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT8E4M3FN and i.dims]
    assert len(fp8_weights) == len(linears)
    _, tables = models.rope(bucket, "tass")
    emulated = BakedRopeDiT(scaled_fp8_dit(models.dit, scales), tables.cos, tables.sin).eval()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    for batch in (1, 3):
        feeds = spec.sample_inputs(seed=4, batch=batch)
        (out,) = session.run(None, {k: feeds[k] for k in names})
        with torch.no_grad():
            ref = emulated(*[torch.from_numpy(feeds[t.name]) for t in spec.inputs])
        assert out.shape == tuple(ref.shape) and rel_l2(out, ref) < 1e-4


def test_which_builds_take_the_files_scales(fp8_files, tmp_path: Path) -> None:
    """FP8 engines from an FP8 file take its scales; `--calibrate-fp8` overrides them; float engines and float
    files never do (decided from the headers)."""
    from stdrc.engines.build import BuildConfig, scales_from_file
    from stdrc.export.models import plan_sources

    fp8 = plan_sources(get_preset("tiny"), fp8_files("tiny"), 0, None, None, None)
    bf16 = plan_sources(get_preset("tiny"), fp8_files("tiny").with_name("tiny.safetensors"), 0, None, None, None)
    seeded = plan_sources(get_preset("tiny"), None, 0, None, None, None)
    assert scales_from_file(BuildConfig(precision="fp8"), fp8)
    assert not scales_from_file(BuildConfig(precision="fp8", calibrate_fp8=True), fp8)
    assert not scales_from_file(BuildConfig(precision="bf16"), fp8)
    assert not scales_from_file(BuildConfig(precision="fp8"), bf16)
    assert not scales_from_file(BuildConfig(precision="fp8"), seeded)
