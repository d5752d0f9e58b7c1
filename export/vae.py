"""LTX-2 video VAE (ltx-core's encoder and decoder) behind export-friendly forwards.

The decoder's own forward draws `torch.randn` decode noise; `DecoderForExport` runs the same
computation without it, and the runtime mixes seeded noise in before calling the engine.
"""

from __future__ import annotations

import torch
from ltx_core.model.video_vae.model_configurator import VideoDecoderConfigurator, VideoEncoderConfigurator
from ltx_core.model.video_vae.resnet import ResnetBlock3D, UNetMidBlock3D
from ltx_core.model.video_vae.ops import unpatchify
from ltx_core.model.video_vae.video_vae import VideoDecoder, VideoEncoder

from stdrc.export.config import VAEConfig
from stdrc.export.dit import init_seeded
from stdrc.export.errors import ExportError

VAE_ENCODER_INPUTS = ("image",)
VAE_ENCODER_OUTPUTS = ("latent",)
VAE_DECODER_INPUTS = ("latent", "timestep")
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
    """ltx-core's `VideoDecoder.forward` minus the random decode noise (the caller mixes it in)."""

    def __init__(self, decoder: VideoDecoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, latent: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        d = self.decoder
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


def mix_decode_noise(latent: torch.Tensor, noise: torch.Tensor, scale: float) -> torch.Tensor:
    """What ltx-core's decoder does to its input before decoding when timestep-conditioned."""
    return noise * scale + (1.0 - scale) * latent
