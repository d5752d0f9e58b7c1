"""The text side: encoder hidden states -> LTX-2 feature extractor + connector -> DiT context.

The `tiny` preset uses a seeded byte-level encoder (no download). Real LTX-2 checkpoints use
Gemma-3 from a local folder through transformers (`load_gemma_encoder`), with ltx-core's
feature extractor and connector. The connector's padding-to-register swap is rewritten with
static shapes (ltx-core's uses boolean indexing) and checked against ltx-core's own.
"""

from __future__ import annotations

import torch
from ltx_core.text_encoders.gemma.embeddings_connector import Embeddings1DConnector
from ltx_core.text_encoders.gemma.embeddings_processor import convert_to_additive_mask
from ltx_core.text_encoders.gemma.feature_extractor import FeatureExtractorV1
from ltx_core.model.transformer.rope import generate_freq_grid_pytorch, precompute_freqs_cis
from ltx_core.utils import rms_norm

from stdrc.export.config import TextConfig
from stdrc.export.dit import init_seeded
from stdrc.export.errors import CheckpointError

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


def move_valid_to_front(hidden: torch.Tensor, mask: torch.Tensor, registers: torch.Tensor) -> torch.Tensor:
    """Left-padded tokens moved to the front, padding replaced by tiled registers (static shapes)."""
    length = hidden.shape[1]
    valid = mask.sum(dim=1, keepdim=True)  # [B, 1]
    index = (torch.arange(length, device=hidden.device)[None, :] + (length - valid)) % length
    shifted = torch.gather(hidden, 1, index[..., None].expand(-1, -1, hidden.shape[-1]))
    keep = (torch.arange(length, device=hidden.device)[None, :] < valid)[..., None]
    tiled = registers.to(hidden.dtype).repeat(length // registers.shape[0], 1)[None]
    return torch.where(keep, shifted, tiled)


class TextSide(torch.nn.Module):
    """token ids [1, L] + mask [1, L] -> context [1, L, caption_channels] + context mask [1, L]."""

    def __init__(self, cfg: TextConfig, encoder: torch.nn.Module):
        super().__init__()
        self.cfg = cfg
        self.encoder = encoder
        flat = cfg.encoder_dim * (cfg.encoder_layers + 1)
        self.feature_extractor = FeatureExtractorV1(torch.nn.Linear(flat, cfg.encoder_dim, bias=False))
        self.connector = Embeddings1DConnector(
            attention_head_dim=cfg.connector_head_dim,
            num_attention_heads=cfg.connector_heads,
            num_layers=cfg.connector_layers,
            num_learnable_registers=cfg.max_length if cfg.kind == "tiny" else 128,
        )
        # The connector's RoPE angles reach ~1e5 rad (max_pos [1]): float32 cos/sin of them differ
        # between runtimes by ~1e-2, so the table is computed once here, in torch, and baked.
        grid = torch.arange(cfg.max_length, dtype=torch.float32)[None, None, :]
        cos, sin = precompute_freqs_cis(
            grid, dim=self.connector.inner_dim, out_dtype=torch.float32,
            theta=self.connector.positional_embedding_theta, max_pos=self.connector.positional_embedding_max_pos,
            num_attention_heads=self.connector.num_attention_heads, rope_type=self.connector.rope_type,
            freq_grid_generator=generate_freq_grid_pytorch,
        )
        self.register_buffer("connector_cos", cos, persistent=False)
        self.register_buffer("connector_sin", sin, persistent=False)

    def forward(self, token_ids: torch.Tensor, token_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        states = self.encoder(token_ids, token_mask)
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

    def ltx_reference(self, token_ids: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        """ltx-core's own connector path, for parity tests (batch 1, boolean indexing)."""
        states = self.encoder(token_ids, token_mask)
        features, _ = self.feature_extractor(states, token_mask, "left")
        additive = convert_to_additive_mask(token_mask, features.dtype)
        encoded, _ = self.connector(features, additive)
        return encoded


def build_text_side(cfg: TextConfig, seed: int | None = 0) -> TextSide:
    if cfg.kind != "tiny":
        raise CheckpointError(
            "the Gemma-3 text side needs real weights: pass --text-encoder DIR (a local Gemma-3 folder)"
        )
    side = TextSide(cfg, TinyTextEncoder(cfg))
    if seed is not None:
        init_seeded(side, seed + 3, std=0.2)
    return side.eval()
