"""The `upsampler` component against ltx-core: its `LatentUpsampler` built and loaded from the same file by its
own model builder (as ltx-pipelines loads the spatial upscaler), with `upsample_video` around it and the VAE
statistics read through ltx-core's own VAE key filter; through PyTorch and ONNX Runtime (fp32), for the tiny
presets' upsampler and (slow lane) the real x2 width on a small grid. The files are benchmarks/synthetic.py's.
The header checks refuse a wrong file before any tensor is read."""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnxruntime as ort
import pytest
import torch
from ltx_core.loader.sft_loader import SafetensorsStateDictLoader
from ltx_core.loader.single_gpu_model_builder import SingleGPUModelBuilder
from ltx_core.model.upsampler import LatentUpsamplerConfigurator, upsample_video
from ltx_core.model.video_vae.model_configurator import VAE_ENCODER_COMFY_KEYS_FILTER
from ltx_core.model.video_vae.ops import PerChannelStatistics
from safetensors.torch import save_file

from stdrc.export import checkpoint
from stdrc.export.checkpoint import open_checkpoint
from stdrc.export.errors import CheckpointError
from stdrc.export.onnx_export import export_onnx
from stdrc.export.specs import upsampler_spec
from stdrc.export.upsampler import (
    TINY_UPSAMPLER,
    X2_UPSAMPLER,
    UpsamplerConfig,
    UpsampleVideo,
    build_upsampler,
    load_upsampler,
    open_upsampler,
    read_statistics,
    save_upsampler,
)

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"

TOL = 1e-5  # rel L2, fp32
CHANNELS = 128  # the VAE's latent channels (every LTX VAE)
GRIDS = ((2, 3, 4), (3, 2, 2))  # stage-1 latent grids (frames, height, width): the default first


def _rel_l2(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got.astype(np.float64) - want) / np.linalg.norm(want.astype(np.float64)))


def write_statistics(path: Path, channels: int = CHANNELS, seed: int = 3) -> Path:
    """A file holding the VAE's per-channel statistics under the shipped names (the rest of a VAE is not read)."""
    gen = torch.Generator().manual_seed(seed)
    stats = {"vae.per_channel_statistics.std-of-means": 0.5 + torch.rand(channels, generator=gen),
             "vae.per_channel_statistics.mean-of-means": torch.randn(channels, generator=gen) * 0.5}
    save_file(stats, str(path))
    return path


def ltx_core_upsample(upsampler_path: Path, stats_path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    """latent -> ltx-core's upsample_video(latent, encoder, upsampler), everything loaded by ltx-core itself."""
    upsampler = SingleGPUModelBuilder(model_class_configurator=LatentUpsamplerConfigurator,
                                      model_path=str(upsampler_path)).build(device=torch.device("cpu"),
                                                                            dtype=torch.float32).eval()
    sd = SafetensorsStateDictLoader().load(str(stats_path), sd_ops=VAE_ENCODER_COMFY_KEYS_FILTER).sd
    stats = PerChannelStatistics(CHANNELS)
    stats.load_state_dict({k.removeprefix("per_channel_statistics."): v for k, v in sd.items()})
    encoder = SimpleNamespace(per_channel_statistics=stats)  # upsample_video reads nothing else of the encoder
    return lambda latent: upsample_video(latent, encoder, upsampler)


def write_upsampler(path: Path, cfg: UpsamplerConfig, seed: int = 7) -> Path:
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module("synthetic").write_upsampler(path, cfg, seed)
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("upsampler")
    path = write_upsampler(folder / "tiny-spatial-upscaler-x2.safetensors", TINY_UPSAMPLER)
    return path, write_statistics(folder / "vae-stats.safetensors")


@pytest.fixture(scope="module")
def ours(files: tuple[Path, Path]) -> UpsampleVideo:
    path, stats = files
    return UpsampleVideo(load_upsampler(open_upsampler(path, CHANNELS)), read_statistics(open_checkpoint(stats)))


def _latent(grid: tuple[int, int, int], seed: int = 0) -> torch.Tensor:
    return torch.randn(1, CHANNELS, *grid, generator=torch.Generator().manual_seed(seed))


def test_config_and_statistics_read_from_the_files(files: tuple[Path, Path], ours: UpsampleVideo) -> None:
    path, _ = files
    assert open_upsampler(path, CHANNELS).config == TINY_UPSAMPLER
    assert ours.std.shape == (1, CHANNELS, 1, 1, 1) and float(ours.std.min()) >= 0.5  # the file's, not ones


def _check_parity(files: tuple[Path, Path], ours: UpsampleVideo, grids: tuple[tuple[int, int, int], ...],
                  folder: Path) -> None:
    """ours (PyTorch, then exported with `grids` as its stage-1 grids) vs ltx-core on every grid."""
    reference = ltx_core_upsample(*files)
    onnx_path = export_onnx(ours, upsampler_spec(CHANNELS, grids), folder / "upsampler.onnx")
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    for i, grid in enumerate(grids):
        latent = _latent(grid, seed=i)
        with torch.no_grad():
            want = reference(latent).numpy()
            got = ours(latent).numpy()
        f, h, w = grid
        assert want.shape == (1, CHANNELS, f, 2 * h, 2 * w)
        assert got.shape == want.shape and _rel_l2(got, want) <= TOL
        (onnx_out,) = session.run(["upsampled"], {"latent": latent.numpy()})
        assert onnx_out.shape == want.shape and _rel_l2(onnx_out, want) <= TOL


def test_pytorch_and_onnxruntime_match_ltx_core(files: tuple[Path, Path], ours: UpsampleVideo,
                                                 tmp_path: Path) -> None:
    assert upsampler_spec(CHANNELS, GRIDS).dynamic_dims == {
        "latent_frames": [2, 2, 3], "latent_height": [2, 3, 3], "latent_width": [2, 4, 4]}
    _check_parity(files, ours, GRIDS, tmp_path)


@pytest.mark.slow
def test_real_width_matches_ltx_core(tmp_path: Path) -> None:
    """The released x2 width and depth (bf16 file, ~250 MB; fp32 in both paths) on one small grid.
    Measured 9.6 s, peak RSS 2.0 GB (the whole module) on the shared 2-core VM (2026-12-06)."""
    path = write_upsampler(tmp_path / "ltx-2-spatial-upscaler-x2.safetensors", X2_UPSAMPLER)
    file = open_upsampler(path, CHANNELS)
    assert file.config == X2_UPSAMPLER and file.checkpoint.shapes["upsampler.0.weight"] == (2048, 512, 3, 3)
    files = (path, write_statistics(tmp_path / "vae-stats.safetensors"))
    ours = UpsampleVideo(load_upsampler(file), read_statistics(open_checkpoint(files[1])))
    _check_parity(files, ours, ((2, 2, 3),), tmp_path)


def _rewrite(src: Path, dst: Path, config: dict | None = None, drop: str | None = None,
             reshape: str | None = None) -> Path:
    """`src` with another `config` (None: none), one tensor dropped or one reshaped."""
    from safetensors import safe_open

    with safe_open(str(src), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != drop}
    if reshape is not None:
        tensors[reshape] = torch.zeros(tensors[reshape].shape[0] + 1, *tensors[reshape].shape[1:])
    save_file(tensors, str(dst), metadata={"config": json.dumps(config)} if config is not None else None)
    return dst


@pytest.mark.parametrize(("case", "message"), [
    ("no_config", r"no `config` metadata"),
    ("temporal", r"not an x2 spatial upsampler \(temporal_upsample=True\)"),
    ("rational", r"not an x2 spatial upsampler \(rational_resampler=True\)"),
    ("channels", r"upsamples 16-channel latents and the VAE's have 128"),
    ("float_width", r"mid_channels=512.0, not an integer"),
    ("groups", r"config is not one ltx-core builds"),
    ("missing_key", r"1 missing: final_conv.bias"),
    ("wrong_shape", r"wrong shape: initial_conv.bias"),
    ("absent", r"does not exist"),
])
def test_header_checks_refuse_before_any_tensor_is_read(files: tuple[Path, Path], tmp_path: Path, case: str,
                                                         message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = files
    cfg = TINY_UPSAMPLER.ltx_config()
    bad = tmp_path / f"{case}.safetensors"
    if case == "no_config":
        _rewrite(path, bad)
    elif case in ("temporal", "rational"):
        _rewrite(path, bad, {**cfg, f"{case}_upsample" if case == "temporal" else "rational_resampler": True})
    elif case == "channels":
        small = UpsamplerConfig(in_channels=16, mid_channels=32, num_blocks_per_stage=1)
        save_upsampler(bad, build_upsampler(small, 0), small)
    elif case == "float_width":
        _rewrite(path, bad, {**cfg, "mid_channels": 512.0})
    elif case == "groups":
        _rewrite(path, bad, {**cfg, "mid_channels": 40})
    elif case == "missing_key":
        _rewrite(path, bad, cfg, drop="final_conv.bias")
    elif case == "wrong_shape":
        _rewrite(path, bad, cfg, reshape="initial_conv.bias")
    monkeypatch.setattr(checkpoint, "_read_tensor", lambda *a: pytest.fail("a tensor was read"))
    with pytest.raises(CheckpointError, match=message) as err:
        open_upsampler(bad, CHANNELS)
    assert "\n" not in str(err.value) and "--upsampler" in str(err.value)


def test_low_precision_weights_keep_the_normalisation_in_fp32(files: tuple[Path, Path], ours: UpsampleVideo) -> None:
    """The engine built for fp16/bf16 (weights in that dtype behind CastIO, as build-engines exports them): the
    latent input stays fp32 (`fp32_inputs`) and the statistics are applied in fp32, within bf16's tolerance."""
    from stdrc.export.onnx_export import CastIO

    path, stats = files
    half = CastIO(UpsampleVideo(load_upsampler(open_upsampler(path, CHANNELS), torch.bfloat16),
                                read_statistics(open_checkpoint(stats))))
    assert half.keep == {0} and half.dtype == torch.bfloat16 and half.module.std.dtype == torch.float32
    latent = _latent(GRIDS[0], seed=4)
    with torch.no_grad():
        got, want = half(latent), ours(latent)
    assert got.dtype == torch.float32 and 0 < _rel_l2(got.numpy(), want.numpy()) <= 3e-2  # verify's bf16 tolerance
