"""The PyTorch modules of a preset (seeded) or a checkpoint, ready to export per bucket."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from stdrc.export.checkpoint import config_from_metadata, load_strict, read_checkpoint, read_metadata_config
from stdrc.export.config import Preset, get_preset
from stdrc.export.dit import BakedRopeDiT, STDRCTransformer, build_dit
from stdrc.export.reference import token_positions
from stdrc.export.rope import RopeTables, rope_tables
from stdrc.export.errors import CheckpointError
from stdrc.export.lora import LoraSet, LoraSpec, dit_shapes
from stdrc.export.text import GemmaText, TextSide, build_text_side, load_gemma
from stdrc.export.vae import DecoderForExport, EncoderForExport, build_vae
from stdrc.runtime.manifest import Bucket
from stdrc.runtime.text import ByteTokenizer


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
    gemma: GemmaText | None = None
    loras: LoraSet | None = None  # fused into `dit`

    def tokenize(self, prompt: str) -> tuple[np.ndarray, np.ndarray]:
        """[1, L] token ids and mask as the bundle's runtime tokenizer gives them (bytes, or Gemma's)."""
        length = self.preset.text.max_length
        if self.gemma is None:
            return ByteTokenizer(length)(prompt)
        encoded = self.gemma.tokenizer(prompt.strip(), padding="max_length", max_length=length, truncation=True,
                                       return_tensors="np")
        return encoded["input_ids"].astype(np.int64), encoded["attention_mask"].astype(np.int64)

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
    text_encoder: str | Path | None = None,
    text_checkpoint: str | Path | None = None,
    loras: tuple[LoraSpec, ...] = (),
) -> ModelSet:
    """Seeded modules for `preset_name`, with DiT/VAE weights from `checkpoint` when given.

    `text_encoder`: a local Gemma-3 folder (else the preset's tiny text encoder). The text
    projection and connector come from `text_checkpoint`, else from `checkpoint`.
    `loras` are checked against the DiT's shapes before any weight is read, then fused.
    """
    preset = preset or get_preset(preset_name)
    lora_set = None
    if loras:  # headers only: the LoRAs against the DiT the preset and checkpoint metadata describe
        meta = read_metadata_config(checkpoint) if checkpoint is not None else None
        lora_set = LoraSet.load(loras, dit_shapes(config_from_metadata(preset, meta).dit))
    ckpt = None
    if checkpoint is not None:
        ckpt = read_checkpoint(checkpoint)
        preset = config_from_metadata(preset, ckpt.metadata_config)
    dit = build_dit(preset.dit, seed=None if ckpt else seed)
    encoder, decoder = build_vae(preset.vae, seed=seed)
    if ckpt is not None:
        load_strict(dit.ltx, lora_set.fuse_state(ckpt.dit) if lora_set else ckpt.dit, "DiT", ckpt.path)
        if ckpt.vae_encoder or ckpt.vae_decoder:
            load_strict(encoder, ckpt.vae_encoder, "VAE encoder", ckpt.path)
            load_strict(decoder, ckpt.vae_decoder, "VAE decoder", ckpt.path)
    elif lora_set:
        dit.ltx.load_state_dict(lora_set.fuse_state(dit.ltx.state_dict()), strict=True)
    gemma = load_gemma(text_encoder, preset.text.max_length) if text_encoder is not None else None
    text = build_text_side(preset.text, seed=seed, gemma=gemma)
    preset = replace(preset, text=text.cfg)
    sources = [ckpt.sha256 if ckpt else config_hash(preset, seed)]
    text_state, text_path = (ckpt.text, ckpt.path) if ckpt else ({}, None)
    if text_checkpoint is not None:
        text_ckpt = read_checkpoint(text_checkpoint)
        text_state, text_path = text_ckpt.text, text_ckpt.path
        sources.append(text_ckpt.sha256)
        if not text_state:
            raise CheckpointError(
                f"{text_ckpt.path} holds no text projection or connector: pass the LTX-2 checkpoint as --text-checkpoint"
            )
    if text_state:
        parts = torch.nn.ModuleDict({"feature_extractor": text.feature_extractor, "connector": text.connector})
        load_strict(parts, text_state, "text projection and connector", text_path)
    elif ckpt is not None and gemma is not None:
        raise CheckpointError(
            f"{ckpt.path} holds no text projection or connector for the Gemma-3 text side: "
            "pass the LTX-2 checkpoint that has them as --text-checkpoint"
        )
    if gemma is not None:
        sources.append(gemma.sha256)
    if lora_set:
        sources.append(lora_set.digest())
    source = sources[0] if len(sources) == 1 else hashlib.sha256("".join(sources).encode()).hexdigest()
    return ModelSet(preset, dit, encoder, decoder, text, face=_face_module(preset, seed, face_weights),
                    source_sha256=source, checkpoint_sha256=ckpt.sha256 if ckpt else None, gemma=gemma,
                    loras=lora_set)
