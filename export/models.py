"""The PyTorch modules of a preset (seeded) or a checkpoint, ready to export per bucket."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from stdrc.export.checkpoint import config_from_metadata, load_strict, read_checkpoint
from stdrc.export.config import Preset, get_preset
from stdrc.export.dit import BakedRopeDiT, STDRCTransformer, build_dit
from stdrc.export.reference import token_positions
from stdrc.export.rope import RopeTables, rope_tables
from stdrc.export.text import TextSide, build_text_side
from stdrc.export.vae import DecoderForExport, EncoderForExport, build_vae
from stdrc.runtime.manifest import Bucket


@dataclass
class ModelSet:
    preset: Preset
    dit: STDRCTransformer
    vae_encoder: torch.nn.Module
    vae_decoder: torch.nn.Module
    text: TextSide
    face: torch.nn.Module | None
    source_sha256: str  # checkpoint file hash, or a hash of the seeded preset config
    checkpoint_sha256: str | None

    def rope(self, bucket: Bucket, layout: str = "tass") -> tuple[torch.Tensor, RopeTables]:
        grid = (bucket.latent_frames, bucket.latent_height, bucket.latent_width)
        positions = token_positions(grid, layout, bucket.fps)
        return positions, rope_tables(positions, self.preset.dit)

    def export_modules(self, bucket: Bucket, layout: str = "tass") -> dict[str, torch.nn.Module]:
        _, tables = self.rope(bucket, layout)
        modules = {
            "text_encoder": self.text,
            "dit": BakedRopeDiT(self.dit, tables.cos, tables.sin),
            "vae_encoder": EncoderForExport(self.vae_encoder),
            "vae_decoder": DecoderForExport(self.vae_decoder),
        }
        if self.face is not None:
            modules["face_encoder"] = self.face
        return {k: v.eval() for k, v in modules.items()}


def config_hash(preset: Preset, seed: int) -> str:
    text = json.dumps({"preset": preset.to_json(), "seed": seed}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _face_module(preset: Preset, seed: int, face_weights: str | Path | None) -> torch.nn.Module | None:
    try:
        from stdrc.export import face
    except ImportError:
        return None
    if face_weights is not None:
        module = face.load_arcface_backbone(face_weights, "r50")
    else:
        module = face.build_face_encoder("tiny" if preset.name == "tiny" else "r50", seed=seed)
    return face.FaceEncoderForExport(face.fold_batchnorm(module))


def load_models(
    preset_name: str = "tiny",
    checkpoint: str | Path | None = None,
    seed: int = 0,
    face_weights: str | Path | None = None,
    preset: Preset | None = None,
) -> ModelSet:
    """Seeded modules for `preset_name`, with DiT/VAE weights from `checkpoint` when given."""
    preset = preset or get_preset(preset_name)
    ckpt = None
    if checkpoint is not None:
        ckpt = read_checkpoint(checkpoint)
        preset = config_from_metadata(preset, ckpt.metadata_config)
    dit = build_dit(preset.dit, seed=None if ckpt else seed)
    encoder, decoder = build_vae(preset.vae, seed=seed)
    if ckpt is not None:
        load_strict(dit.ltx, ckpt.dit, "DiT", ckpt.path)
        if ckpt.vae_encoder or ckpt.vae_decoder:
            load_strict(encoder, ckpt.vae_encoder, "VAE encoder", ckpt.path)
            load_strict(decoder, ckpt.vae_decoder, "VAE decoder", ckpt.path)
    text = build_text_side(preset.text, seed=seed)
    face = _face_module(preset, seed, face_weights)
    source = ckpt.sha256 if ckpt else config_hash(preset, seed)
    return ModelSet(preset, dit, encoder, decoder, text, face, source, ckpt.sha256 if ckpt else None)
