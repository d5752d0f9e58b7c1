"""Lightricks' x2 spatial latent upsampler (`--upsampler FILE`) with ltx-core's `upsample_video` arithmetic.

The file (`*-spatial-upscaler-x2-*.safetensors`) holds ltx-core's `LatentUpsampler` state dict under its
own names and its hyper-parameters as JSON `config` metadata, read as `LatentUpsamplerConfigurator` reads
them (its default for an absent key). Only the x2 spatial kind fits two-stage generation (stage 1 samples
at half width and height); the x1.5 rational and the temporal upsamplers are refused.

The engine (`UpsampleVideo`) maps the normalised stage-1 latent [1, C, F, h, w] to the normalised latent
[1, C, F, 2h, 2w]: un-normalise with the VAE encoder's per-channel statistics (from the main checkpoint),
run the upsampler, re-normalise, as `ltx_core.model.upsampler.upsample_video` does. A file is judged by
its header alone (config, channels, key names and shapes against a meta-device module) before any
tensor is read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from ltx_core.loader.sd_ops import SDOps
from ltx_core.loader.sft_loader import SafetensorsStateDictLoader
from ltx_core.loader.single_gpu_model_builder import SingleGPUModelBuilder
from ltx_core.model.upsampler.model import LatentUpsampler, upsample_video
from ltx_core.model.upsampler.model_configurator import LatentUpsamplerConfigurator
from ltx_core.model.video_vae.ops import PerChannelStatistics
from safetensors.torch import save_file

from stdrc.export.checkpoint import LazyCheckpoint, check_shapes, load_streaming, open_checkpoint
from stdrc.export.dit import init_seeded
from stdrc.export.errors import CheckpointError

UPSAMPLER_INPUTS = ("latent",)
UPSAMPLER_OUTPUTS = ("upsampled",)
SCALE = 2  # width and height; frames unchanged
FLAG = "--upsampler"
WHAT = "x2 spatial latent upsampler"
PART = "upsampler"  # the LazyCheckpoint component its tensors are listed under
STATS = ("std-of-means", "mean-of-means")  # the VAE's per-channel statistics (ltx-core's buffer names)
_STATS_PREFIX = "per_channel_statistics."
SEED_OFFSET = 5  # the seeded upsampler's seed after the build's (the VAE takes +1 and +2)
# the kind two-stage generation needs, as ltx-core's configurator keys name it
_X2_SPATIAL = {"spatial_upsample": True, "temporal_upsample": False, "spatial_scale": 2.0, "rational_resampler": False}


@dataclass(frozen=True)
class UpsamplerConfig:
    """The x2 spatial `LatentUpsampler`'s free hyper-parameters; defaults are ltx-core's configurator's,
    which are the x2 spatial file's (Conv3d 128 -> 512, 4 + 4 ResBlocks, per-frame Conv2d 512 -> 2048 +
    PixelShuffle(2))."""

    in_channels: int = 128
    mid_channels: int = 512
    num_blocks_per_stage: int = 4
    dims: int = 3

    def ltx_config(self) -> dict[str, Any]:
        """The flat dict `LatentUpsamplerConfigurator.from_config` reads (a file's `config` metadata)."""
        return {"_class_name": "LatentUpsampler", "in_channels": self.in_channels,
                "mid_channels": self.mid_channels, "num_blocks_per_stage": self.num_blocks_per_stage,
                "dims": self.dims, **_X2_SPATIAL}


X2_UPSAMPLER = UpsamplerConfig()  # the released x2 spatial file's width and depth
TINY_UPSAMPLER = UpsamplerConfig(mid_channels=32, num_blocks_per_stage=1)  # the tiny presets' (GroupNorm: 32 groups)


def upsampler_from_metadata(config: dict[str, Any] | None, path: Path) -> UpsamplerConfig:
    """The upsampler ltx-core builds from a file's `config`, or one CheckpointError naming the fix."""
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} has no `config` metadata naming its upsampler: pass Lightricks' "
                              f"*-spatial-upscaler-x2-*.safetensors as {FLAG}")
    for key, want in _X2_SPATIAL.items():
        if key in config and config[key] != want:
            raise CheckpointError(f"{path} is not an x2 spatial upsampler ({key}={config[key]!r}): two-stage "
                                  f"generation upsamples width and height x2; pass the *-spatial-upscaler-x2-* "
                                  f"file as {FLAG}")
    fields = UpsamplerConfig.__dataclass_fields__
    for key in fields:
        if key in config and type(config[key]) is not int:
            raise CheckpointError(f"{path}'s upsampler config has {key}={config[key]!r}, not an integer: "
                                  f"pass an unmodified *-spatial-upscaler-x2-* file as {FLAG}")
    cfg = UpsamplerConfig(**{k: config[k] for k in fields if k in config})
    try:
        with torch.device("meta"):
            build_upsampler(cfg, seed=None)
    except (ValueError, AssertionError, RuntimeError) as e:
        raise CheckpointError(f"{path}'s upsampler config is not one ltx-core builds ({type(e).__name__}: {e}): "
                              f"pass an unmodified *-spatial-upscaler-x2-* file as {FLAG}") from None
    return cfg


def build_upsampler(cfg: UpsamplerConfig, seed: int | None = 0) -> LatentUpsampler:
    """ltx-core's `LatentUpsampler` as its configurator builds it from `cfg`; seeded weights unless seed is None."""
    if cfg.dims not in (2, 3):
        raise ValueError(f"dims must be 2 or 3, not {cfg.dims}")
    module = LatentUpsamplerConfigurator.from_config(cfg.ltx_config()).eval()
    if seed is not None:
        init_seeded(module, seed)
    return module


def seeded_upsampler(seed: int) -> LatentUpsampler:
    """The tiny presets' random upsampler (`--two-stage` without a file), drawn from the build seed."""
    return build_upsampler(TINY_UPSAMPLER, seed + SEED_OFFSET)


def upsampler_shapes(cfg: UpsamplerConfig) -> dict[str, tuple[int, ...]]:
    """Every state-dict key and shape of the module `cfg` builds, from the meta device (no weight memory)."""
    with torch.device("meta"):
        module = build_upsampler(cfg, seed=None)
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


@dataclass(frozen=True)
class UpsamplerFile:
    """An upsampler file opened by its header: config and key layout checked, no tensor read."""

    checkpoint: LazyCheckpoint  # its one component, PART: every tensor under the file's own name
    config: UpsamplerConfig

    @property
    def path(self) -> Path:
        return self.checkpoint.path

    @property
    def sha256(self) -> str:
        return self.checkpoint.sha256

    def source(self) -> dict[str, str]:
        """Its entry among a component's source files (name + sha256)."""
        return {"file": self.path.name, "sha256": self.sha256}


def open_upsampler(path: str | Path, latent_channels: int, sha256: str | None = None) -> UpsamplerFile:
    """Header checks of `path`, before any tensor is read: safetensors, a `config` ltx-core builds as an x2
    spatial upsampler, in/out channels equal to the VAE's `latent_channels`, and every key and shape of that
    module (no more, no fewer). Any failure is one CheckpointError naming the fix."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"upsampler {path} does not exist: pass the path of the *-spatial-upscaler-x2-* "
                              f".safetensors as {FLAG}")
    ckpt = open_checkpoint(path, sha256)
    cfg = upsampler_from_metadata(ckpt.metadata_config, path)
    if cfg.in_channels != latent_channels:
        raise CheckpointError(f"{path} upsamples {cfg.in_channels}-channel latents and the VAE's have "
                              f"{latent_channels}: pass the upsampler released with this model as {FLAG}")
    check_shapes(upsampler_shapes(cfg), ckpt.shapes, WHAT, path,
                 fix=f"pass an unmodified *-spatial-upscaler-x2-* file as {FLAG}")
    return UpsamplerFile(replace(ckpt, keys={PART: {k: k for k in ckpt.shapes}}), cfg)


def load_upsampler(file: UpsamplerFile, dtype: torch.dtype = torch.float32) -> LatentUpsampler:
    """The file's weights streamed into the module its config builds, one tensor at a time, in `dtype`."""
    with torch.device("meta"):
        module = build_upsampler(file.config, seed=None)
    module = module.to_empty(device="cpu").to(dtype).eval()
    load_streaming(module, file.checkpoint, PART, WHAT)
    return module


def read_statistics(vae: LazyCheckpoint) -> dict[str, torch.Tensor]:
    """The VAE encoder's per-channel statistics (STATS names -> [C] fp32), read from the file holding the VAE:
    these two tensors only."""
    keys = {name: vae.keys["vae_encoder"].get(_STATS_PREFIX + name) for name in STATS}
    missing = [_STATS_PREFIX + k for k, v in keys.items() if v is None]
    if missing:
        raise CheckpointError(f"{vae.path} holds no VAE statistics ({', '.join(missing)}): the upsampler "
                              "needs them; pass the LTX checkpoint with its video VAE")
    only = replace(vae, keys={"stats": {name: file_key for name, file_key in keys.items()}})
    return {name: tensor.float() for name, tensor in only.tensors("stats")}


def module_statistics(encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The same statistics from a built VAE encoder (ltx-core's `VideoEncoder`: seeded presets)."""
    stats = encoder.per_channel_statistics
    return {name: stats.get_buffer(name).detach().float().clone() for name in STATS}


class UpsampleVideo(torch.nn.Module):
    """Normalised latent [1, C, F, h, w] -> normalised latent [1, C, F, 2h, 2w]: `upsample_video`'s arithmetic.

    The statistics are fp32 constants and the (un)normalisation runs in fp32 whatever the weights' dtype (the
    latent input stays fp32 under CastIO: `fp32_inputs`)."""

    fp32_inputs = ("latent",)

    def __init__(self, upsampler: LatentUpsampler, statistics: dict[str, torch.Tensor]):
        super().__init__()
        self.upsampler = upsampler
        shape = (1, -1, 1, 1, 1)
        self.register_buffer("std", statistics["std-of-means"].float().reshape(shape).clone())
        self.register_buffer("mean", statistics["mean-of-means"].float().reshape(shape).clone())

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        dtype = self.upsampler.final_conv.weight.dtype
        x = latent.float() * self.std + self.mean
        x = self.upsampler(x.to(dtype)).float()
        return (x - self.mean) / self.std


class LtxCoreUpsample(torch.nn.Module):
    """ltx-core's own `upsample_video` over ltx-core's modules: `verify`'s reference, independent of
    `UpsampleVideo`. `encoder`: anything with ltx-core's `per_channel_statistics` (a `VideoEncoder`)."""

    def __init__(self, upsampler: LatentUpsampler, encoder: torch.nn.Module):
        super().__init__()
        self.upsampler, self.encoder = upsampler, encoder

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return upsample_video(latent, self.encoder, self.upsampler)


class _Statistics(torch.nn.Module):
    """The part of ltx-core's `VideoEncoder` that `upsample_video` reads."""

    def __init__(self, stats: PerChannelStatistics):
        super().__init__()
        self.per_channel_statistics = stats


def ltx_core_reference(upsampler: Path | LatentUpsampler, vae: Path | torch.nn.Module) -> LtxCoreUpsample:
    """fp32 `upsample_video` as ltx-core loads its pieces: a file through its own model builder (as ltx-pipelines
    loads the spatial upscaler) and the VAE statistics through its own loader and key names; a module (seeded
    presets) as it is."""
    if isinstance(upsampler, Path):
        upsampler = SingleGPUModelBuilder(model_class_configurator=LatentUpsamplerConfigurator,
                                          model_path=str(upsampler)).build(torch.device("cpu"), torch.float32)
    if isinstance(vae, Path):
        prefix = "vae." + _STATS_PREFIX
        ops = SDOps("VAE_STATISTICS").with_matching(prefix=prefix).with_replacement(prefix, "")
        sd = SafetensorsStateDictLoader().load(str(vae), sd_ops=ops).sd
        stats = PerChannelStatistics(sd[STATS[0]].shape[0])
        stats.load_state_dict({k: sd[k].float() for k in STATS})
        vae = _Statistics(stats)
    return LtxCoreUpsample(upsampler.float().eval(), vae.float().eval())


def save_upsampler(path: str | Path, module: LatentUpsampler, cfg: UpsamplerConfig) -> Path:
    """Write `module` as Lightricks ships an upsampler: its state dict under ltx-core's names, `cfg` as the
    `config` metadata (tests, synthetic files)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(tmp),
              metadata={"config": json.dumps(cfg.ltx_config())})
    tmp.replace(path)
    return path
