"""LTX video VAE configs as the files' `vae` sections list them (LTX23.md 1c), at reduced channel width, and a
writer of VAE files in the shipped layout. Shared by the VAE parity (tests/export) and tiling (tests/runtime)
tests; ltx-core builds its reference modules from these sections itself."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from ltx_core.model.video_vae.model_configurator import (
    VAE_DECODER_COMFY_KEYS_FILTER,
    VAE_ENCODER_COMFY_KEYS_FILTER,
    VideoDecoderConfigurator,
    VideoEncoderConfigurator,
)
from safetensors import safe_open
from safetensors.torch import save_file

from stdrc.export.dit import init_seeded


def _blocks(names: list[str], layers: list[int], multipliers: list[int]) -> list:
    """res_x, compression, res_x, ... as the files list them (the decoder's pixel side first)."""
    out = []
    for n, name, m in zip(layers, names, multipliers):
        out += [["res_x", {"num_layers": n}], [name, {"multiplier": m}]]
    return out + [["res_x", {"num_layers": layers[-1]}]]


ENCODER = ["compress_space_res", "compress_time_res", "compress_all_res", "compress_all_res"]
# LTX-2 (3P): encoder multipliers 2,2,2,2; decoder [res_x 5, compress_all(residual, x2)] x3 + res_x 5
LTX2 = {"dims": 3, "in_channels": 3, "out_channels": 3, "latent_channels": 16, "patch_size": 4,
        "norm_layer": "pixel_norm", "latent_log_var": "uniform", "decoder_base_channels": 16,
        "causal_decoder": False, "timestep_conditioning": True,
        "encoder_blocks": _blocks(ENCODER, [4, 6, 6, 2, 2], [2, 2, 2, 2]),
        "decoder_blocks": [["res_x", {"num_layers": 5, "inject_noise": False}],
                           ["compress_all", {"residual": True, "multiplier": 2}]] * 3
                          + [["res_x", {"num_layers": 5, "inject_noise": False}]]}
# LTX-2.3 (3P, as its file's header lists it): no timestep conditioning, zeros padding, no latent_log_var,
# causal_decoder or decoder_base_channels keys (ltx-core's defaults: uniform, false, 128 -> reduced here)
LTX23 = {"_class_name": "CausalVideoAutoencoder", "dims": 3, "in_channels": 3, "out_channels": 3,
         "latent_channels": 16, "patch_size": 4, "norm_layer": "pixel_norm", "spatial_padding_mode": "zeros",
         "timestep_conditioning": False, "decoder_base_channels": 16,
         "decoder_blocks": _blocks(["compress_space", "compress_time", "compress_all", "compress_all"],
                                   [4, 6, 4, 2, 2], [2, 2, 1, 2]),
         "encoder_blocks": _blocks(ENCODER, [4, 6, 4, 2, 2], [2, 2, 2, 1])}


def ltx_core_vae(section: dict, seed: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """ltx-core's encoder and decoder from the section, seeded; one set of latent statistics (as in files)."""
    encoder = VideoEncoderConfigurator.from_config({"vae": section}).eval()
    decoder = VideoDecoderConfigurator.from_config({"vae": section}).eval()
    init_seeded(encoder, seed)
    init_seeded(decoder, seed + 1)
    decoder.per_channel_statistics.load_state_dict(encoder.per_channel_statistics.state_dict())
    return encoder, decoder


def write_vae_file(path: Path, section: dict, seed: int = 0) -> Path:
    """A VAE-only file in the shipped layout (`vae.encoder.`, `vae.decoder.`, `vae.per_channel_statistics.`)
    with `{"vae": section}` as its config metadata."""
    encoder, decoder = ltx_core_vae(section, seed)
    stats = encoder.per_channel_statistics.state_dict()
    tensors = {f"vae.per_channel_statistics.{k}": v for k, v in stats.items()}
    for side, module in (("encoder", encoder), ("decoder", decoder)):
        tensors.update({f"vae.{side}.{k}": v.contiguous() for k, v in module.state_dict().items()
                        if not k.startswith("per_channel_statistics.")})
    save_file(tensors, str(path), metadata={"config": json.dumps({"vae": section})})
    return path


def ltx_core_from_file(path: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    """ltx-core's modules built from the file's own config, loaded through ltx-core's own key filters."""
    with safe_open(str(path), framework="pt") as f:
        config = json.loads(f.metadata()["config"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    out = []
    for configurator, ops in ((VideoEncoderConfigurator, VAE_ENCODER_COMFY_KEYS_FILTER),
                              (VideoDecoderConfigurator, VAE_DECODER_COMFY_KEYS_FILTER)):
        module = configurator.from_config(config).eval()
        state = {ops.apply_to_key(k): v for k, v in tensors.items() if ops.apply_to_key(k) is not None}
        module.load_state_dict(state, strict=True)
        out.append(module)
    return out[0], out[1]
