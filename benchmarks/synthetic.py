"""Synthetic real-layout inputs: an LTX-2- or LTX-2.3-layout checkpoint at the real width, a random Gemma-3
folder and an x2 spatial latent upsampler file.

Used by the reduced-depth ltx2-video and ltx23-video tests and `build_memory.py`: the full-width model with fewer DiT
and Gemma layers, so the real build path runs on a small machine and its cost can be scaled per layer.
Weights are seeded random (nothing is downloaded); the file holds every tensor ltx-core loads from the files
LTX-2 ships (the transformer's audio stream and the audio connector included: the video-only export must
skip them), under their names, with `config` metadata of the same shape.

`write_fp8_checkpoint` turns such a file into one laid out as Lightricks' pre-quantized FP8 files
(`ltx-2-19b-dev-fp8.safetensors`, ...): the same weights, each Linear ltx-core's fp8_scaled_mm policy
quantizes stored as float8_e4m3fn [out, in] with its fp32 `weight_scale` (max|W| / 448) and `input_scale`.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
from ltx_core.model.transformer.model_configurator import LTXModelConfigurator
from ltx_core.text_encoders.gemma.embeddings_connector import AudioEmbeddings1DConnectorConfigurator
from safetensors import safe_open
from safetensors.torch import save_file

from stdrc.export.checkpoint import V2_CAPTION_CONFIG, save_checkpoint
from stdrc.export.config import ModelFamily, Preset, get_preset
from stdrc.export.dit import fp8_policy_excluded, init_seeded
from stdrc.export.fp8_source import E4M3_MAX, INPUT_SCALE, QUANT_METADATA, WEIGHT_SCALE, quantize
from stdrc.export.models import default_dtype
from stdrc.export.text import TextSide, TinyTextEncoder
from stdrc.export.upsampler import X2_UPSAMPLER, UpsamplerConfig, build_upsampler, save_upsampler
from stdrc.export.vae import build_vae

PROMPTS = ["a woman smiles at the camera", "a man walks on a beach at sunset", "a child laughs in the rain",
           "an old man reads a book", "a dancer spins on a stage", "a chef cooks in a busy kitchen"]


def gemma_config(hidden_size: int = 3840, layers: int = 2, vocab: int = 300, intermediate_size: int = 256,
                 heads: int = 2, kv_heads: int = 1, head_dim: int = 128):
    """The config `write_gemma` writes (build_memory counts a measured run's Gemma from it)."""
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        vocab_size=vocab, hidden_size=hidden_size, intermediate_size=intermediate_size, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, query_pre_attn_scalar=head_dim,
        sliding_window=64,
        max_position_embeddings=2048, layer_types=(["sliding_attention", "full_attention"] * layers)[:layers],
    )


def write_gemma(folder: Path, hidden_size: int = 3840, layers: int = 2, vocab: int = 300, intermediate_size: int = 256,
                heads: int = 2, kv_heads: int = 1, head_dim: int = 128) -> Path:
    """A random `gemma3_text` folder (Gemma-3 12B's width, few layers, small vocab) with a BPE tokenizer.

    The layers are narrow inside by default; 12B's own (15360, 16, 8, 256) measure its per-layer activations."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import Gemma3ForCausalLM, PreTrainedTokenizerFast

    config = gemma_config(hidden_size, layers, vocab, intermediate_size, heads, kv_heads, head_dim)
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


def _unset(build):
    """Modules built on the meta device, then given uninitialised CPU storage: torch's default init (as slow as
    the seeded draw that overwrites it) is skipped. Every state-dict entry is then set by `init_seeded`."""
    with torch.device("meta"):
        built = build()
    return tuple(m.to_empty(device="cpu") for m in built) if isinstance(built, tuple) else built.to_empty(device="cpu")


def real_config(preset: Preset) -> dict:
    """The `config` metadata of a real LTX-2 (or, by the preset's flags, LTX-2.3) file for `preset`:
    ltx-core's whole `transformer` key set (audio stream, audio-video cross-attention, both connectors)
    and the `vae` section, with the preset's values.

    The audio stream is the video one at half the head width (LTX-2: 32 x 64 = 2048); the audio connector
    has one layer (`audio_connector_num_layers`, an ltx-core key) to keep reduced-depth files small."""
    dit, text = preset.dit, preset.text
    t = dit.ltx_config()["transformer"]
    for flag in ("apply_gated_attention", "cross_attention_adaln", "caption_proj_before_connector"):
        if not t[flag]:  # absent from LTX-2 files
            del t[flag]
    if dit.caption_proj_before_connector or text.per_token_projection:  # LTX-2.3's text projection: all four
        t.update(V2_CAPTION_CONFIG)
    if text.connector_gated_attention:
        t["connector_apply_gated_attention"] = True
    audio_head_dim = dit.attention_head_dim // 2
    t.update(
        use_audio_video_cross_attention=True, share_ff=False, av_cross_ada_norm=True,
        audio_num_attention_heads=dit.num_attention_heads, audio_attention_head_dim=audio_head_dim,
        audio_in_channels=dit.in_channels, audio_out_channels=dit.out_channels,
        audio_cross_attention_dim=dit.num_attention_heads * audio_head_dim,
        audio_positional_embedding_max_pos=[20],
        av_ca_timestep_scale_multiplier=1, connector_num_attention_heads=text.connector_heads,
        connector_attention_head_dim=text.connector_head_dim, connector_num_layers=text.connector_layers,
        connector_positional_embedding_max_pos=list(text.connector_max_pos), audio_connector_num_layers=1,
    )
    if text.per_token_projection:  # LTX-2.3's audio connector is as wide as its audio stream (32 x 64, 3P)
        t.update(audio_connector_num_attention_heads=dit.num_attention_heads,
                 audio_connector_attention_head_dim=audio_head_dim)
    vae = {**preset.vae.ltx_config("encoder")["vae"], **preset.vae.ltx_config("decoder")["vae"]}
    if preset.family is ModelFamily.LTX2:
        del vae["spatial_padding_mode"]  # absent from LTX-2 files: ltx-core's defaults apply (2.3's say zeros)
    return {"transformer": t, "vae": vae}


def write_checkpoint(path: Path, preset: Preset, text_layers: int, seed: int = 0, with_vae: bool = True,
                     dtype: torch.dtype = torch.bfloat16) -> Path:
    """Everything ltx-core loads from a real LTX-2 file (ComfyUI prefix), for `preset`, seeded: the
    audio-video transformer built by ltx-core's own configurator (video and audio streams), the text
    projection for a Gemma with `text_layers` layers, both text connectors, the video VAE, and
    `real_config` as metadata."""
    config = real_config(preset)
    text_cfg = replace(preset.text, encoder_layers=text_layers, vocab_size=16)
    with default_dtype(dtype):
        dit = _unset(lambda: LTXModelConfigurator.from_config(config))
        init_seeded(dit, seed, std=0.02)
        side = _unset(lambda: TextSide(text_cfg, TinyTextEncoder(replace(text_cfg, encoder_layers=0))))
        init_seeded(side.feature_extractor, seed + 3, std=0.02)
        init_seeded(side.connector, seed + 4, std=0.02)
        audio_connector = _unset(lambda: AudioEmbeddings1DConnectorConfigurator.from_config(config))
        init_seeded(audio_connector, seed + 5, std=0.02)
        audio_projection = None
        if text_cfg.per_token_projection:  # V2 projects for the audio stream too
            t = config["transformer"]
            flat = text_cfg.encoder_dim * (text_layers + 1)
            width = t["audio_num_attention_heads"] * t["audio_attention_head_dim"]
            audio_projection = _unset(lambda: torch.nn.Linear(flat, width, bias=True))
            init_seeded(audio_projection, seed + 6, std=0.02)
        encoder, decoder = _unset(lambda: build_vae(preset.vae, seed=None)) if with_vae else (None, None)
        for i, module in enumerate((encoder, decoder)):
            if module is not None:
                init_seeded(module, seed + 1 + i, std=0.02)
    version = "2.3.0" if preset.family is ModelFamily.LTX23 else None  # LTX-2.3 files carry one
    save_checkpoint(path, dit, encoder, decoder, config=config, layout="comfy", text=side,
                    audio_connector=audio_connector, audio_projection=audio_projection, model_version=version)
    return path


COMFY = "model.diffusion_model."
# Static activation scale of every synthetic FP8 Linear: activations up to |x| = 8 are representable. The
# DiT's Linears take normed, modulated tokens (unit RMS) or their GELU; real files carry calibrated values.
SYNTHETIC_INPUT_AMAX = 8.0


def fp8_linears(config: dict) -> list[str]:
    """The transformer's Linears (audio stream included, as in real files) that ltx-core's fp8_scaled_mm
    policy quantizes, by module path."""
    with torch.device("meta"):
        model = LTXModelConfigurator.from_config(config)
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not fp8_policy_excluded(n)]


def write_fp8_checkpoint(src: Path, dst: Path) -> Path:
    """The FP8 variant of the real-layout file `src` (`write_checkpoint`, bf16): its quantized Linears as
    float8_e4m3fn [out, in] with fp32 scalar `weight_scale` and `input_scale`, everything else (biases
    included) as in `src`, and `_quantization_metadata` beside `config`."""
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    linears = fp8_linears(json.loads(meta["config"]))
    for name in linears:
        key = COMFY + name
        tensors[f"{key}.weight"], scale = quantize(tensors[f"{key}.weight"])
        tensors[f"{key}.{WEIGHT_SCALE}"] = torch.tensor(scale, dtype=torch.float32)
        tensors[f"{key}.{INPUT_SCALE}"] = torch.tensor(SYNTHETIC_INPUT_AMAX / E4M3_MAX, dtype=torch.float32)
    # TensorRT-LLM's hf_quant_config shape (ModelOpt's recipe) [inferred: the real files' text is not public]
    meta[QUANT_METADATA] = json.dumps({"producer": {"name": "stdrc benchmarks/synthetic.py"},
                                       "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": None}})
    tmp = dst.with_name(f".{dst.name}.tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(dst)
    return dst


def write_upsampler(path: Path, cfg: UpsamplerConfig = X2_UPSAMPLER, seed: int = 0,
                    dtype: torch.dtype = torch.bfloat16) -> Path:
    """An x2 spatial upsampler file as Lightricks ships one (`*-spatial-upscaler-x2-*.safetensors`): ltx-core's
    `LatentUpsampler` state dict under its own names, seeded, and `cfg` as flat `config` metadata. The default
    is the real width (ltx-core's x2 spatial config, ~126 M parameters); `TINY_UPSAMPLER` for the tiny presets."""
    with default_dtype(dtype):
        module = _unset(lambda: build_upsampler(cfg, seed=None))
        init_seeded(module, seed, std=0.02)
    return save_upsampler(path, module, cfg)


def reduced_preset(name: str = "ltx2-video", dit_layers: int = 1, connector_layers: int | None = None) -> Preset:
    """A full-width preset with `dit_layers` transformer blocks (and `connector_layers` connector blocks)."""
    preset = get_preset(name).with_dit(num_layers=dit_layers)
    if connector_layers is None:
        return preset
    return replace(preset, text=replace(preset.text, connector_layers=connector_layers))


def write_ltx2_checkpoint(path: Path, dit_layers: int = 1, gemma_layers: int = 2, seed: int = 0,
                          with_vae: bool = True, dtype: torch.dtype = torch.bfloat16,
                          preset: str = "ltx2-video", connector_layers: int | None = None) -> Path:
    """A real-layout checkpoint of `preset`'s family (`write_checkpoint`) at full width with `dit_layers`
    transformer blocks, a text projection for a Gemma with `gemma_layers` layers, and the full video VAE."""
    return write_checkpoint(path, reduced_preset(preset, dit_layers, connector_layers), gemma_layers, seed,
                            with_vae, dtype)


def checkpoint_name(preset: str = "ltx2-video", dit_layers: int = 1, connector_layers: int | None = None) -> str:
    """The bf16 checkpoint's file name `write_all` writes (its FP8 variant adds `-fp8`)."""
    stem = "ltx2" if preset == "ltx2-video" else preset.removesuffix("-video")
    layers = f"{dit_layers}layer" + ("" if connector_layers is None else f"-{connector_layers}conn")
    return f"{stem}-{layers}.safetensors"


def write_all(folder: Path, dit_layers: int = 1, gemma_layers: int = 2, preset: str = "ltx2-video",
              connector_layers: int | None = None, fp8: bool = False) -> tuple[Path, Path]:
    """(checkpoint, Gemma folder) under `folder`, written once (reused when present). `preset`: ltx2-video
    (an LTX-2 file) or ltx23-video (an LTX-2.3 file: model_version 2.3.0, the 2.3 keys and config). `fp8`:
    the checkpoint is the FP8 variant of the bf16 one (`write_fp8_checkpoint`), written beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    ckpt = folder / checkpoint_name(preset, dit_layers, connector_layers)
    gemma = folder / f"gemma-3-w3840-{gemma_layers}layer"
    if not ckpt.is_file():
        write_ltx2_checkpoint(ckpt, dit_layers, gemma_layers, preset=preset, connector_layers=connector_layers)
    if fp8:
        bf16, ckpt = ckpt, ckpt.with_name(ckpt.stem + "-fp8.safetensors")
        if not ckpt.is_file():
            write_fp8_checkpoint(bf16, ckpt)
    if not (gemma / "config.json").is_file():
        write_gemma(gemma, layers=gemma_layers)
    (folder / "README.json").write_text(json.dumps({"checkpoint": ckpt.name, "gemma": gemma.name}))
    return ckpt, gemma
