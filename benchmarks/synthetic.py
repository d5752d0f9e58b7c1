"""Synthetic real-layout inputs: an LTX-2-layout checkpoint at the real width and a random Gemma-3 folder.

Used by the reduced-depth ltx2-video test and `build_memory.py`: the full-width model with fewer DiT
and Gemma layers, so the real build path runs on a small machine and its cost can be scaled per layer.
Weights are seeded random (nothing is downloaded); the file layout is what LTX-2 ships.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from stdrc.export.checkpoint import save_checkpoint
from stdrc.export.config import get_preset
from stdrc.export.dit import build_dit, init_seeded
from stdrc.export.models import default_dtype
from stdrc.export.text import TextSide, TinyTextEncoder
from stdrc.export.vae import build_vae

PROMPTS = ["a woman smiles at the camera", "a man walks on a beach at sunset", "a child laughs in the rain",
           "an old man reads a book", "a dancer spins on a stage", "a chef cooks in a busy kitchen"]


def write_gemma(folder: Path, hidden_size: int = 3840, layers: int = 2, vocab: int = 300, intermediate_size: int = 256,
                heads: int = 2, kv_heads: int = 1, head_dim: int = 128) -> Path:
    """A random `gemma3_text` folder (Gemma-3 12B's width, few layers, small vocab) with a BPE tokenizer.

    The layers are narrow inside by default; 12B's own (15360, 16, 8, 256) measure its per-layer activations."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, PreTrainedTokenizerFast

    config = Gemma3TextConfig(
        vocab_size=vocab, hidden_size=hidden_size, intermediate_size=intermediate_size, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, query_pre_attn_scalar=head_dim,
        sliding_window=64,
        max_position_embeddings=2048, layer_types=(["sliding_attention", "full_attention"] * layers)[:layers],
    )
    torch.manual_seed(0)
    with default_dtype(torch.bfloat16):
        model = Gemma3ForCausalLM(config)
    model.save_pretrained(folder)
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace()
    bpe.decoder = decoders.Metaspace()
    bpe.train_from_iterator(PROMPTS, trainers.BpeTrainer(vocab_size=vocab - 10,
                                                         special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"]))
    bpe.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(folder)
    return folder


def _unset(build):  # noqa: ANN001, ANN202
    """Modules built on the meta device, then given uninitialised CPU storage: torch's default init (as slow as
    the seeded draw that overwrites it) is skipped. Every state-dict entry is then set by `init_seeded`."""
    with torch.device("meta"):
        built = build()
    return tuple(m.to_empty(device="cpu") for m in built) if isinstance(built, tuple) else built.to_empty(device="cpu")


def write_ltx2_checkpoint(path: Path, dit_layers: int = 1, gemma_layers: int = 2, seed: int = 0,
                          with_vae: bool = True, dtype: torch.dtype = torch.bfloat16) -> Path:
    """An LTX-2-layout (ComfyUI prefix) checkpoint: DiT at full width with `dit_layers` blocks, text projection
    and connector for a Gemma with `gemma_layers` layers, and the full video VAE; config metadata as LTX-2's."""
    preset = get_preset("ltx2-video")
    dit_cfg = replace(preset.dit, num_layers=dit_layers)
    text_cfg = replace(preset.text, kind="gemma", encoder_layers=gemma_layers, vocab_size=16)
    with default_dtype(dtype):
        dit = _unset(lambda: build_dit(dit_cfg, seed=None))
        init_seeded(dit, seed, std=0.02)
        side = _unset(lambda: TextSide(text_cfg, TinyTextEncoder(replace(text_cfg, encoder_layers=0))))
        init_seeded(side.feature_extractor, seed + 3, std=0.02)
        init_seeded(side.connector, seed + 4, std=0.02)
        encoder, decoder = _unset(lambda: build_vae(preset.vae, seed=None)) if with_vae else (None, None)
        for i, module in enumerate((encoder, decoder)):
            if module is not None:
                init_seeded(module, seed + 1 + i, std=0.02)
    config = {"transformer": {"num_layers": dit_layers}}
    save_checkpoint(path, dit.ltx, encoder, decoder, config=config, layout="comfy", text=side)
    return path


def write_all(folder: Path, dit_layers: int = 1, gemma_layers: int = 2) -> tuple[Path, Path]:
    """(checkpoint, Gemma folder) under `folder`, written once (reused when present)."""
    folder.mkdir(parents=True, exist_ok=True)
    ckpt, gemma = folder / f"ltx2-{dit_layers}layer.safetensors", folder / f"gemma-3-w3840-{gemma_layers}layer"
    if not ckpt.is_file():
        write_ltx2_checkpoint(ckpt, dit_layers, gemma_layers)
    if not (gemma / "config.json").is_file():
        write_gemma(gemma, layers=gemma_layers)
    (folder / "README.json").write_text(json.dumps({"checkpoint": ckpt.name, "gemma": gemma.name}))
    return ckpt, gemma
