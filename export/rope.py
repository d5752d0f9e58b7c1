"""RoPE tables from positions, computed once per shape bucket with ltx-core's own math."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from ltx_core.model.transformer.rope import (
    LTXRopeType,
    generate_freq_grid_np,
    generate_freq_grid_pytorch,
    precompute_freqs_cis,
)

from stdrc.export.config import DiTConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RopeTables:
    cos: torch.Tensor  # interleaved: (1, N, inner); split: (1, heads, N, head_dim/2)
    sin: torch.Tensor
    rope_type: str
    max_position_ratio: float  # largest midpoint position / max_pos; > 1 means RoPE extrapolates


def max_position_ratio(positions: torch.Tensor, max_pos: tuple[int, ...]) -> float:
    middle = positions.mean(dim=-1)  # (1, 3, N)
    limits = torch.tensor(max_pos, dtype=middle.dtype).view(1, -1, 1)
    return float((middle / limits).max())


def rope_tables(positions: torch.Tensor, dit: DiTConfig) -> RopeTables:
    """cos/sin for `positions` (1, 3, N, 2), equal to what ltx-core computes inside its forward."""
    generator = generate_freq_grid_np if dit.frequencies_precision == "float64" else generate_freq_grid_pytorch
    cos, sin = precompute_freqs_cis(
        positions,
        dim=dit.inner_dim,
        out_dtype=torch.float32,
        theta=dit.positional_embedding_theta,
        max_pos=list(dit.positional_embedding_max_pos),
        use_middle_indices_grid=True,
        num_attention_heads=dit.num_attention_heads,
        rope_type=LTXRopeType(dit.rope_type),
        freq_grid_generator=generator,
    )
    ratio = max_position_ratio(positions, dit.positional_embedding_max_pos)
    if ratio > 1.0:
        log.warning(
            "token positions reach %.2fx of max_pos %s: RoPE extrapolates beyond its trained range "
            "(the TASS shift doubles the spatial extent; use a smaller bucket to stay inside it)",
            ratio, list(dit.positional_embedding_max_pos),
        )
    return RopeTables(cos.contiguous(), sin.contiguous(), dit.rope_type, ratio)
