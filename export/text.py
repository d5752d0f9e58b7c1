"""The text side: encoder hidden states -> LTX-2's feature extractor + connector -> DiT context.

Two engines: `text_gemma` (`TextStates`: token ids -> every hidden state) and `text_head` (`TextHead`:
hidden states -> context), so a staged run never holds Gemma and the head at once.

The `tiny` preset uses a seeded byte-level encoder (no download). Real checkpoints use Gemma-3 from a
local folder through transformers (`load_gemma`), with ltx-core's connector and its feature extractor's
arithmetic (V1 for LTX-2, V2 for LTX-2.3, as the config says), computed one hidden state at a time
(`LayerwiseFeatureExtractor`, `LayerwiseFeatureExtractorV2`).
The connector's padding-to-register swap is rewritten with static shapes (ltx-core's uses boolean
indexing). Both are checked against ltx-core's own.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from ltx_core.model.transformer.rope import (
    LTXRopeType,
    generate_freq_grid_np,
    generate_freq_grid_pytorch,
    precompute_freqs_cis,
)
from ltx_core.text_encoders.gemma.embeddings_connector import Embeddings1DConnector
from ltx_core.text_encoders.gemma.embeddings_processor import convert_to_additive_mask
from ltx_core.text_encoders.gemma.feature_extractor import FeatureExtractorV1, FeatureExtractorV2
from ltx_core.utils import rms_norm

from stdrc.export.config import TextConfig
from stdrc.export.dit import init_seeded
from stdrc.export.errors import CheckpointError, ExportError
from stdrc.runtime.manifest import sha256_file

TEXT_INPUTS = ("token_ids", "token_mask")
TEXT_OUTPUTS = ("context", "context_mask")


class TinyTextEncoder(torch.nn.Module):
    """A small seeded transformer returning every layer's hidden states, like an LLM's."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.embed = torch.nn.Embedding(cfg.vocab_size, cfg.encoder_dim)
        self.layers = torch.nn.ModuleList(
            torch.nn.ModuleDict({
                "qkv": torch.nn.Linear(cfg.encoder_dim, 3 * cfg.encoder_dim),
                "out": torch.nn.Linear(cfg.encoder_dim, cfg.encoder_dim),
                "mlp": torch.nn.Linear(cfg.encoder_dim, cfg.encoder_dim),
            })
            for _ in range(cfg.encoder_layers)
        )

    def forward(self, token_ids: torch.Tensor, token_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = self.embed(token_ids)
        bias = ((token_mask.to(h.dtype) - 1) * 1e4)[:, None, None, :]
        states = [h]
        for layer in self.layers:
            q, k, v = layer["qkv"](torch.nn.functional.rms_norm(h, (h.shape[-1],))).chunk(3, dim=-1)
            att = torch.nn.functional.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None], attn_mask=bias)
            h = h + layer["out"](att[:, 0])
            h = h + layer["mlp"](torch.nn.functional.gelu(h))
            states.append(h)
        return tuple(states)


class LayerwiseFeatureExtractor(torch.nn.Module):
    """ltx-core's `FeatureExtractorV1` (per-layer masked normalisation -> `aggregate_embed`), one hidden state at
    a time.

    ltx-core stacks the L hidden states to [B, T, D, L] and keeps several masked copies of that stack
    live (at Gemma-3 12B's 49 states and 1024 tokens each fp32 copy is 771 MB). Here each state is
    normalised alone and multiplied by its own weight columns: flattening [B, T, D, L] to [B, T, D * L]
    puts state l of width index d in column d * L + l, so state l owns columns l, l + L, ... Same
    weights and state dict (`aggregate_embed.weight`, `.bias` if any), same dtypes as ltx-core's
    (the mean and the normalised values in fp32 for 16-bit states, as torch's promotion makes them
    there); the products are summed in fp32. Padding left or right, as in ltx-core.
    """

    def __init__(self, aggregate_embed: torch.nn.Linear):
        super().__init__()
        self.aggregate_embed = aggregate_embed

    def forward(self, hidden_states: tuple[torch.Tensor, ...] | list[torch.Tensor], attention_mask: torch.Tensor,
                padding_side: str = "left") -> tuple[torch.Tensor, None]:
        states = list(hidden_states)
        count, dtype = len(states), states[0].dtype
        b, t, d = states[0].shape
        lengths = attention_mask.sum(dim=-1)
        index = torch.arange(t, device=attention_mask.device)[None, :]
        if padding_side == "left":
            valid = index >= t - lengths[:, None]
        elif padding_side == "right":
            valid = index < lengths[:, None]
        else:
            raise ExportError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
        pad = ~valid[..., None]  # [B, T, 1]
        denom = (lengths * d).view(b, 1, 1) + 1e-6  # int64 + float: the default (fp32) dtype, as in ltx-core

        def normed(h: torch.Tensor) -> torch.Tensor:
            mean = h.masked_fill(pad, 0.0).sum(dim=(1, 2), keepdim=True) / denom
            low = h.masked_fill(pad, float("inf")).amin(dim=(1, 2), keepdim=True)
            high = h.masked_fill(pad, float("-inf")).amax(dim=(1, 2), keepdim=True)
            return (8 * (h - mean) / (high - low + 1e-6)).masked_fill(pad, 0.0).to(dtype)

        return project_layerwise(map(normed, states), count, self.aggregate_embed).to(dtype), None


class LayerwiseFeatureExtractorV2(torch.nn.Module):
    """ltx-core's `FeatureExtractorV2` (LTX-2.3), video branch only, one hidden state at a time.

    Per token and per state: `h * rsqrt(mean_d(h ** 2) + 1e-6)`, padding zeroed (by the mask, any side),
    times sqrt(out / `embedding_dim`), then `video_aggregate_embed` (bias) on that state's columns, the
    products summed in fp32 (see `LayerwiseFeatureExtractor`). ltx-core runs the norm in the states' dtype
    (bf16); here it runs in fp32 and its result is rounded once to that dtype, so fp16 states do not
    overflow. `embedding_dim` is the encoder's width (ltx-core takes Gemma-3 12B's 3840 from its config).
    The audio aggregate embed is not built: the exported model has no audio stream.
    """

    def __init__(self, video_aggregate_embed: torch.nn.Linear, embedding_dim: int):
        super().__init__()
        self.video_aggregate_embed = video_aggregate_embed
        self.embedding_dim = embedding_dim

    def forward(self, hidden_states: tuple[torch.Tensor, ...] | list[torch.Tensor],
                attention_mask: torch.Tensor, padding_side: str = "left",  # ltx-core's signature; unused
                ) -> tuple[torch.Tensor, None]:
        states = list(hidden_states)
        dtype = states[0].dtype
        pad = ~attention_mask.bool()[..., None]  # [B, T, 1]
        scale = math.sqrt(self.video_aggregate_embed.out_features / self.embedding_dim)

        def normed(h: torch.Tensor) -> torch.Tensor:
            x = h.float()  # fp16 squares overflow past |h| = 256, which Gemma's later states reach
            rms = x * torch.rsqrt(torch.mean(x**2, dim=-1, keepdim=True) + 1e-6)
            return (rms.masked_fill(pad, 0.0) * scale).to(dtype)

        return project_layerwise(map(normed, states), len(states), self.video_aggregate_embed).to(dtype), None


def project_layerwise(normed: Iterable[torch.Tensor], count: int, linear: torch.nn.Linear) -> torch.Tensor:
    """`linear` over the [B, T, D * count] flattening of `count` states (state index fastest), one state at a
    time: state l owns weight columns l, l + count, ...; the products and the bias are summed in fp32."""
    total = None
    for layer, x in enumerate(normed):
        part = torch.nn.functional.linear(x, linear.weight[:, layer::count]).float()
        total = part if total is None else total + part
    if linear.bias is not None:
        total = total + linear.bias.float()
    return total


def move_valid_to_front(hidden: torch.Tensor, mask: torch.Tensor, registers: torch.Tensor) -> torch.Tensor:
    """Left-padded tokens moved to the front, padding replaced by tiled registers (static shapes)."""
    length = hidden.shape[1]
    valid = mask.sum(dim=1, keepdim=True)  # [B, 1]
    index = (torch.arange(length, device=hidden.device)[None, :] + (length - valid)) % length
    shifted = torch.gather(hidden, 1, index[..., None].expand(-1, -1, hidden.shape[-1]))
    keep = (torch.arange(length, device=hidden.device)[None, :] < valid)[..., None]
    tiled = registers.to(hidden.dtype).repeat(length // registers.shape[0], 1)[None]
    return torch.where(keep, shifted, tiled)


class TextHead(torch.nn.Module):
    """The `text_head` engine: token mask [1, L] + the encoder's L_s hidden states ([1, L, D] each, the Gemma
    engine's outputs) -> context [1, L, connector_dim] + context mask [1, L].

    The feature extractor (one state at a time) and the connector; no encoder weights. The states arrive as
    separate inputs in the engine precision, so nothing stacks them ([L, T, D]) on either side."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        flat = cfg.encoder_dim * (cfg.encoder_layers + 1)
        if cfg.per_token_projection:
            self.feature_extractor = LayerwiseFeatureExtractorV2(
                torch.nn.Linear(flat, cfg.connector_dim, bias=True), embedding_dim=cfg.encoder_dim)
        else:
            self.feature_extractor = LayerwiseFeatureExtractor(
                torch.nn.Linear(flat, cfg.encoder_dim, bias=False))
        if cfg.max_length % cfg.connector_registers:
            raise ExportError(
                f"text length {cfg.max_length} is not a multiple of the connector's {cfg.connector_registers} "
                "registers: pick a text length that is"
            )
        if not cfg.per_token_projection and cfg.encoder_dim != cfg.connector_dim:
            raise ExportError(
                f"the text encoder's width {cfg.encoder_dim} differs from the connector's {cfg.connector_dim}: "
                "pick the preset that matches this text encoder (Gemma-3 12B: ltx2-video or ltx23-video)"
            )
        double = cfg.frequencies_precision == "float64"
        self.connector = Embeddings1DConnector(
            attention_head_dim=cfg.connector_head_dim,
            num_attention_heads=cfg.connector_heads,
            num_layers=cfg.connector_layers,
            positional_embedding_max_pos=list(cfg.connector_max_pos),
            num_learnable_registers=cfg.connector_registers,
            rope_type=LTXRopeType(cfg.rope_type),
            double_precision_rope=double,
            apply_gated_attention=cfg.connector_gated_attention,
        )
        # The connector's RoPE angles reach ~1e5 rad (max_pos [1]): float32 cos/sin of them differ
        # between runtimes by ~1e-2, so the table is computed once here, in torch, and baked.
        # On the CPU even inside a meta-device build: ltx-core memoises the frequency grid
        # (functools.lru_cache), and a grid made on meta would break every later build in the process.
        with torch.device("cpu"):
            grid = torch.arange(cfg.max_length, dtype=torch.float32)[None, None, :]
            cos, sin = precompute_freqs_cis(
                grid, dim=self.connector.inner_dim, out_dtype=torch.float32,
                theta=self.connector.positional_embedding_theta, max_pos=self.connector.positional_embedding_max_pos,
                num_attention_heads=self.connector.num_attention_heads, rope_type=self.connector.rope_type,
                freq_grid_generator=generate_freq_grid_np if double else generate_freq_grid_pytorch,
            )
        self.register_buffer("connector_cos", cos, persistent=False)
        self.register_buffer("connector_sin", sin, persistent=False)

    def forward(self, token_mask: torch.Tensor, *states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features, _ = self.feature_extractor(states, token_mask, "left")
        registers = self.connector.learnable_registers
        hidden = move_valid_to_front(features, token_mask, registers)
        # after the register swap every position is visible to the connector and to the DiT
        bias = torch.zeros(hidden.shape[0], 1, 1, hidden.shape[1], dtype=hidden.dtype)
        pe = (self.connector_cos.to(hidden.dtype), self.connector_sin.to(hidden.dtype))
        # ltx-core's 1D block minus its `squeeze(1)` calls, which export as failing ONNX Squeeze nodes
        for block in self.connector.transformer_1d_blocks:
            hidden = block.attn1(rms_norm(hidden), mask=bias, pe=pe) + hidden
            hidden = block.ff(rms_norm(hidden)) + hidden
        context = rms_norm(hidden)
        return context, torch.ones_like(token_mask)

    def ltx_reference(self, token_mask: torch.Tensor, *states: torch.Tensor) -> torch.Tensor:
        """ltx-core's own feature extractor and connector (its embeddings processor's video path, batch 1,
        boolean indexing) on the same weights, for parity tests and `verify`."""
        extractor = self.feature_extractor
        if isinstance(extractor, LayerwiseFeatureExtractorV2):
            reference = FeatureExtractorV2(extractor.video_aggregate_embed, extractor.embedding_dim)
        else:
            reference = FeatureExtractorV1(extractor.aggregate_embed)
        features, _ = reference(states, token_mask, "left")
        additive = convert_to_additive_mask(token_mask, features.dtype)
        encoded, _ = self.connector(features, additive)
        return encoded


class LtxCoreTextHead(torch.nn.Module):
    """`TextHead.ltx_reference` with the engine's interface (context, context mask): `verify`'s reference."""

    def __init__(self, head: TextHead):
        super().__init__()
        self.head = head

    def forward(self, token_mask: torch.Tensor, *states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head.ltx_reference(token_mask, *states), torch.ones_like(token_mask)


class TextStates(torch.nn.Module):
    """The `text_gemma` engine: token ids [1, L] + mask [1, L] -> the encoder's hidden states, [1, L, D] each
    (`hidden_state_0` the embeddings, then one a layer), in the engine precision (`native_outputs`: CastIO
    leaves them 16-bit in a 16-bit engine: half the bytes that cross to the head)."""

    native_outputs = True

    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, token_ids: torch.Tensor, token_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # padding zeroed: what Gemma leaves there (fully masked attention rows) differs between runtimes, and the
        # head masks those positions out anyway (both feature extractors)
        states = self.encoder(token_ids, token_mask)
        keep = token_mask[..., None].to(states[0].dtype)
        return tuple(h * keep for h in states)


class TextSide(torch.nn.Module):
    """token ids [1, L] + mask [1, L] -> context [1, L, connector_dim] + context mask [1, L]: the encoder,
    then the head. Bundles run it as two engines (`text_gemma` = `TextStates`, `text_head` = `TextHead`);
    this whole is what tests compare with ltx-core's Gemma encoder + embeddings processor."""

    def __init__(self, cfg: TextConfig, encoder: torch.nn.Module):
        super().__init__()
        self.cfg = cfg
        self.encoder = encoder
        self.head = TextHead(cfg)

    @property
    def feature_extractor(self) -> torch.nn.Module:
        return self.head.feature_extractor

    @property
    def connector(self) -> Embeddings1DConnector:
        return self.head.connector

    def forward(self, token_ids: torch.Tensor, token_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(token_mask, *self.encoder(token_ids, token_mask))

    def ltx_reference(self, token_ids: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        """ltx-core's own feature extractor and connector path, for parity tests (batch 1, boolean indexing)."""
        return self.head.ltx_reference(token_mask, *self.encoder(token_ids, token_mask))


class GemmaEncoder(torch.nn.Module):
    """Gemma-3's language model returning every layer's hidden states, which LTX-2's feature extractor reads."""

    def __init__(self, language_model: torch.nn.Module):
        super().__init__()
        self.language_model = language_model

    def forward(self, token_ids: torch.Tensor, token_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.language_model(
            input_ids=token_ids, attention_mask=token_mask, output_hidden_states=True, use_cache=False
        )
        return tuple(out.hidden_states)


@dataclass(frozen=True)
class GemmaText:
    """A local Gemma-3 folder, loaded: the language model, its tokenizer, and a hash of the folder."""

    folder: Path
    encoder: GemmaEncoder | None  # None when loaded with weights=False (config and tokenizer only)
    tokenizer: Any  # transformers' tokenizer, as ltx-core's LTXVGemmaTokenizer configures it
    hidden_size: int
    num_layers: int
    vocab_size: int
    sha256: str
    num_heads: int = 16
    intermediate_size: int = 15360

    def text_config(self, base: TextConfig) -> TextConfig:
        return replace(base, kind="gemma", vocab_size=self.vocab_size, encoder_dim=self.hidden_size,
                       encoder_layers=self.num_layers, encoder_heads=self.num_heads, encoder_ffn=self.intermediate_size)

    def tokenizer_json(self) -> str:
        """The tokenizer as `tokenizers` runs it (BOS template included), padding and truncation left to the caller."""
        from tokenizers import Tokenizer

        copy = Tokenizer.from_str(self.tokenizer.backend_tokenizer.to_str())  # the loaded tokenizer stays as is
        copy.no_padding()
        copy.no_truncation()
        return copy.to_str()

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)


_GEMMA_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "tokenizer.model")


def _folder_sha256(folder: Path) -> str:
    """Config, tokenizer and every weight file: a changed Gemma folder never reuses a cached export."""
    digest = hashlib.sha256()
    files = [folder / n for n in _GEMMA_FILES] + sorted(folder.glob("*.safetensors"))
    for path in files:
        if path.is_file():
            digest.update(path.name.encode())
            digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def load_gemma(folder: str | Path, max_length: int, dtype: torch.dtype = torch.float32,
               weights: bool = True) -> GemmaText:
    """Gemma-3 (`gemma3` or text-only `gemma3_text`) and its tokenizer from a local folder, in `dtype`.

    `weights=False` reads the config and tokenizer only (argument checks before a build loads anything).
    transformers loads the safetensors shards lazily, straight into `dtype`.
    """
    folder = Path(folder)
    fix = "pass a local Gemma-3 folder (config.json, *.safetensors, tokenizer.json) to --text-encoder"
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{folder} has no config.json: {fix}")
    try:
        model_type = json.loads(config_path.read_text()).get("model_type")
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{config_path} is not valid JSON ({e}): {fix}") from e
    if model_type not in ("gemma3", "gemma3_text"):
        raise CheckpointError(f"{folder} holds a {model_type!r} model, not Gemma-3: {fix}")
    if not (folder / "tokenizer.json").is_file():
        raise CheckpointError(f"{folder} has no tokenizer.json (the runtime runs it with `tokenizers`): {fix}")
    if not list(folder.glob("*.safetensors")):
        raise CheckpointError(f"{folder} has no .safetensors weights (pickled weights are never loaded): {fix}")
    from transformers import AutoConfig, AutoTokenizer, Gemma3ForCausalLM, Gemma3ForConditionalGeneration

    language_model = None
    try:
        if not weights:
            config = AutoConfig.from_pretrained(folder, local_files_only=True)
            text_config = config.text_config if model_type == "gemma3" else config
        elif model_type == "gemma3":
            full = Gemma3ForConditionalGeneration.from_pretrained(folder, local_files_only=True, dtype=dtype)
            language_model, text_config = full.model.language_model, full.config.text_config
        else:
            full = Gemma3ForCausalLM.from_pretrained(folder, local_files_only=True, dtype=dtype)
            language_model, text_config = full.model, full.config
    except Exception as e:  # transformers raises many types for truncated or mismatched weights
        raise CheckpointError(f"{folder}: Gemma-3 weights could not be loaded ({str(e).splitlines()[0]}): {fix}") from e
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, model_max_length=max_length)
    except Exception as e:
        raise CheckpointError(f"{folder}: the tokenizer could not be loaded ({str(e).splitlines()[0]}): {fix}") from e
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise CheckpointError(f"{folder}: the tokenizer is not backed by tokenizer.json: {fix}")
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return GemmaText(
        folder=folder, encoder=GemmaEncoder(language_model).eval() if language_model is not None else None,
        tokenizer=tokenizer,
        hidden_size=int(text_config.hidden_size), num_layers=int(text_config.num_hidden_layers),
        vocab_size=int(text_config.vocab_size), sha256=_folder_sha256(folder),
        num_heads=int(text_config.num_attention_heads), intermediate_size=int(text_config.intermediate_size),
    )


def build_text_side(cfg: TextConfig, seed: int | None = 0, gemma: GemmaText | None = None,
                    encoder: torch.nn.Module | None = None) -> TextSide:
    """The text side with seeded projection and connector (a checkpoint's weights load over them). `encoder`:
    Gemma's stand-in when only the head is wanted (`cfg` then Gemma's text config)."""
    if gemma is not None or encoder is not None:
        side = TextSide(gemma.text_config(cfg), gemma.encoder) if gemma is not None else TextSide(cfg, encoder)
        if seed is not None:
            init_seeded(side.feature_extractor, seed + 3, std=0.2)
            init_seeded(side.connector, seed + 4, std=0.2)
        return side.eval()
    if cfg.kind != "tiny":
        raise CheckpointError(
            "the Gemma-3 text side needs real weights: pass --text-encoder DIR (a local Gemma-3 folder)"
        )
    side = TextSide(cfg, TinyTextEncoder(cfg))
    if seed is not None:
        init_seeded(side, seed + 3, std=0.2)
    return side.eval()
