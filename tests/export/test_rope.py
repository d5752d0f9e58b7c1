"""RoPE tables per bucket equal ltx-core's precompute_freqs_cis; extrapolation is warned about."""

from __future__ import annotations

import logging

import pytest
import torch
from ltx_core.model.transformer.rope import (
    LTXRopeType,
    generate_freq_grid_np,
    generate_freq_grid_pytorch,
    precompute_freqs_cis,
)

from stdrc.export.config import get_preset
from stdrc.export.reference import token_positions
from stdrc.export.rope import rope_tables


@pytest.mark.parametrize("rope_type", ["interleaved", "split"])
@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_tables_equal_ltx_core(rope_type: str, precision: str) -> None:
    cfg = get_preset("tiny").with_dit(rope_type=rope_type, frequencies_precision=precision).dit
    positions = token_positions((2, 3, 4), "tass", 24.0)
    ours = rope_tables(positions, cfg)
    grid = generate_freq_grid_np if precision == "float64" else generate_freq_grid_pytorch
    cos, sin = precompute_freqs_cis(positions, dim=cfg.inner_dim, out_dtype=torch.float32, max_pos=[20, 2048, 2048],
                                    use_middle_indices_grid=True, num_attention_heads=cfg.num_attention_heads,
                                    rope_type=LTXRopeType(rope_type), freq_grid_generator=grid)
    assert torch.equal(ours.cos, cos) and torch.equal(ours.sin, sin)
    n = 24 + 12
    if rope_type == "split":
        assert ours.cos.shape == (1, cfg.num_attention_heads, n, cfg.attention_head_dim // 2)
    else:
        assert ours.cos.shape == (1, n, cfg.inner_dim)


def test_warns_when_positions_exceed_max_pos(caplog: pytest.LogCaptureFixture) -> None:
    cfg = get_preset("tiny").dit
    with caplog.at_level(logging.WARNING, logger="stdrc.export.rope"):
        small = rope_tables(token_positions((2, 3, 4), "tass", 24.0), cfg)
    assert small.max_position_ratio < 1 and not caplog.records
    # 1536 px wide: the TASS shift puts reference tokens near 3072 px > max_pos 2048
    with caplog.at_level(logging.WARNING, logger="stdrc.export.rope"):
        big = rope_tables(token_positions((1, 2, 48), "tass", 24.0), cfg)
    assert big.max_position_ratio > 1
    assert any("extrapolates" in r.message for r in caplog.records)
