"""The LTX video VAE (ltx-core's encoder and decoder) behind export-friendly forwards.

Built from a checkpoint's `vae` config as ltx-core's configurators build it (`vae_from_metadata`).
A timestep-conditioned decoder's own forward draws `torch.randn` decode noise; `DecoderForExport`
runs the same computation without it, and the runtime mixes seeded noise in before calling the
engine. A decoder without timestep conditioning (LTX-2.3's) takes the latent alone: no timestep
input, no decode noise.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from ltx_core.model.video_vae.model_configurator import VideoDecoderConfigurator, VideoEncoderConfigurator
from ltx_core.model.video_vae.ops import unpatchify
from ltx_core.model.video_vae.resnet import ResnetBlock3D, UNetMidBlock3D
from ltx_core.model.video_vae.video_vae import VideoDecoder, VideoEncoder

from stdrc.export.config import VAEConfig
from stdrc.export.dit import init_seeded
from stdrc.export.errors import CheckpointError, ExportError

# keys of ltx-core's `vae` section whose value is fixed here: RGB video through 3-D convolutions
_FIXED = {"dims": 3, "in_channels": 3, "out_channels": 3}
_SAME_NAME = ("latent_channels", "patch_size", "norm_layer", "latent_log_var", "decoder_base_channels",
              "causal_decoder", "timestep_conditioning")


def vae_from_metadata(section: dict[str, Any], base: VAEConfig) -> VAEConfig:
    """The VAE ltx-core's configurators build from a checkpoint's `vae` section: every key they read, and
    their default where the file has none (VAEConfig's defaults), `base`'s decode constants kept. A value
    ltx-core refuses, or one this export cannot take, is one CheckpointError (built on the meta device:
    no weight is allocated)."""
    for key, want in _FIXED.items():
        if section.get(key, want) != want:
            raise CheckpointError(f"the checkpoint's vae config has {key}={section[key]!r}: only {key}="
                                  f"{want} (RGB video, 3-D convolutions) is supported; use an LTX video VAE")
    for key in _SAME_NAME:
        kind = type(getattr(VAEConfig, key))  # the dataclass default's type: bool, int or str
        if key in section and type(section[key]) is not kind:
            raise CheckpointError(f"the checkpoint's vae config has {key}={section[key]!r}, not of type "
                                  f"{kind.__name__}: use an LTX video VAE checkpoint, or fix its `config`")
    cfg = VAEConfig(
        **{k: section[k] for k in _SAME_NAME if k in section},
        **{k: tuple((name, params) for name, params in section[k])
           for k in ("encoder_blocks", "decoder_blocks") if k in section},
        decode_timestep=base.decode_timestep, decode_noise_scale=base.decode_noise_scale,
    )
    if "spatial_padding_mode" in section:  # ltx-core applies the one key to encoder and decoder alike
        mode = section["spatial_padding_mode"]
        cfg = replace(cfg, encoder_spatial_padding_mode=mode, decoder_spatial_padding_mode=mode)
    try:
        with torch.device("meta"):
            build_vae(cfg, seed=None)
    except (ValueError, KeyError, TypeError, NotImplementedError) as e:
        raise CheckpointError(f"the checkpoint's vae config is not one ltx-core builds ({type(e).__name__}: "
                              f"{e}): use an LTX video VAE checkpoint, or fix its `config` metadata"
                              ) from None
    except ExportError as e:
        raise CheckpointError(str(e)) from None
    return cfg


VAE_ENCODER_INPUTS = ("image",)
VAE_ENCODER_OUTPUTS = ("latent",)
VAE_DECODER_OUTPUTS = ("video",)


def build_vae(cfg: VAEConfig, seed: int | None = 0,
              which: str | None = None) -> tuple[VideoEncoder | None, VideoDecoder | None]:
    """Encoder and decoder; `which` ("vae_encoder"/"vae_decoder") builds only that one (the other is None)."""
    for name, params in cfg.decoder_blocks:
        if isinstance(params, dict) and params.get("inject_noise"):
            raise ExportError(
                f"decoder block {name!r} injects noise inside forward, which cannot be exported "
                "deterministically: use a checkpoint config with inject_noise false"
            )
    encoder = decoder = None
    if which in (None, "vae_encoder"):
        encoder = VideoEncoderConfigurator.from_config(cfg.ltx_config("encoder")).eval()
        if seed is not None:
            init_seeded(encoder, seed + 1)
    if which in (None, "vae_decoder"):
        decoder = VideoDecoderConfigurator.from_config(cfg.ltx_config("decoder")).eval()
        if seed is not None:
            init_seeded(decoder, seed + 2)
    return encoder, decoder


class EncoderForExport(torch.nn.Module):
    """Reference photo as a 1-frame video [1, 3, 1, H, W] in [-1, 1] -> normalised latent [1, C, 1, H/32, W/32]."""

    def __init__(self, encoder: VideoEncoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.encoder(image)


class DecoderForExport(torch.nn.Module):
    """ltx-core's `VideoDecoder.forward` minus the random decode noise (the caller mixes it in).

    `timestep` is an input only of a timestep-conditioned decoder (export/specs.py); None otherwise."""

    def __init__(self, decoder: VideoDecoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, latent: torch.Tensor, timestep: torch.Tensor | None = None) -> torch.Tensor:
        d = self.decoder
        if d.timestep_conditioning and timestep is None:
            raise ExportError("a timestep-conditioned VAE decoder needs its timestep input")
        batch = latent.shape[0]
        sample = d.per_channel_statistics.un_normalize(latent)
        sample = d.conv_in(sample, causal=d.causal)
        scaled = timestep * d.timestep_scale_multiplier.to(sample) if d.timestep_conditioning else None
        for block in d.up_blocks:
            if isinstance(block, UNetMidBlock3D):
                sample = block(sample, causal=d.causal, timestep=scaled)
            elif isinstance(block, ResnetBlock3D):
                sample = block(sample, causal=d.causal)
            else:
                sample = block(sample, causal=d.causal)
        sample = d.conv_norm_out(sample)
        if d.timestep_conditioning:
            emb = d.last_time_embedder(timestep=scaled.flatten(), hidden_dtype=sample.dtype)
            ada = d.last_scale_shift_table[None, ..., None, None, None].to(sample) + emb.reshape(
                batch, 2, -1, 1, 1, 1
            )
            shift, scale = ada.unbind(dim=1)
            sample = sample * (1 + scale) + shift
        sample = d.conv_act(sample)
        sample = d.conv_out(sample, causal=d.causal)
        return unpatchify(sample, patch_size_hw=d.patch_size, patch_size_t=1)


class LtxCoreDecoder(torch.nn.Module):
    """ltx-core's own `VideoDecoder.forward` with its decode noise scaled to zero (the engine's input is
    already mixed): `verify`'s reference, independent of `DecoderForExport`."""

    def __init__(self, decoder: VideoDecoder):
        super().__init__()
        self.decoder = decoder
        decoder.decode_noise_scale = 0.0  # noise * 0 + latent: exact

    def forward(self, latent: torch.Tensor, timestep: torch.Tensor | None = None) -> torch.Tensor:
        return self.decoder(latent, timestep)


def ltx_core_reference(ckpt: Any, name: str) -> torch.nn.Module:
    """fp32 `vae_encoder`/`vae_decoder` as ltx-core builds it from the checkpoint's own `config` (its
    configurators, not this project's reading of it), the file's weights streamed in: what `verify`
    compares a bundle's VAE with when the file has a `vae` section."""
    from stdrc.export.checkpoint import load_streaming  # checkpoint.py imports this module

    configurator = VideoEncoderConfigurator if name == "vae_encoder" else VideoDecoderConfigurator
    with torch.device("meta"):
        module = configurator.from_config(ckpt.metadata_config)
    module = module.to_empty(device="cpu").float().eval()
    load_streaming(module, ckpt, name, "VAE " + name.split("_")[1])
    return EncoderForExport(module) if name == "vae_encoder" else LtxCoreDecoder(module)


def mix_decode_noise(latent: torch.Tensor, noise: torch.Tensor, scale: float) -> torch.Tensor:
    """What ltx-core's decoder does to its input before decoding when timestep-conditioned."""
    return noise * scale + (1.0 - scale) * latent
