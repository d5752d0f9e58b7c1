"""The export-friendly DiT computes exactly what ltx-core's own LTXModel.forward computes."""

from __future__ import annotations

import pytest
import torch
from ltx_core.guidance.perturbations import BatchedPerturbationConfig
from ltx_core.model.transformer.modality import Modality

from stdrc.export.config import get_preset
from stdrc.export.dit import build_dit
from stdrc.export.reference import token_positions
from stdrc.export.rope import rope_tables

GRID = (2, 3, 4)  # latent T, H, W
VIDEO, REF = 24, 12
TOL = 1e-5

VARIANTS = {
    "interleaved": {},
    "split": {"rope_type": "split"},
    "interleaved-fp64": {"frequencies_precision": "float64"},
    "split-fp64": {"rope_type": "split", "frequencies_precision": "float64"},
    "gated-adaln": {"apply_gated_attention": True, "cross_attention_adaln": True},
}


def _inputs(batch: int, tokens: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(batch, tokens, 128, generator=g)
    sigma = torch.rand(batch, generator=g) * 0.9 + 0.05
    timestep = sigma[:, None].expand(batch, tokens).clone()
    timestep[:, VIDEO:] = 0.0
    context = torch.randn(batch, 16, 32, generator=g)
    context_mask = torch.ones(batch, 16, dtype=torch.int64)
    context_mask[:, :4] = 0
    return latent, timestep, context, context_mask


def _ltx(dit, latent, timestep, positions, context, context_mask, attention_mask=None):
    b = latent.shape[0]
    modality = Modality(latent=latent, sigma=timestep[:, 0], timesteps=timestep,
                        positions=positions.expand(b, -1, -1, -1), context=context, context_mask=context_mask,
                        attention_mask=attention_mask)
    out, _ = dit.ltx(video=modality, audio=None, perturbations=BatchedPerturbationConfig.empty(b))
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("with_reference", [False, True], ids=["video-only", "with-reference"])
def test_matches_ltx_core_forward(variant: str, with_reference: bool) -> None:
    preset = get_preset("tiny").with_dit(**VARIANTS[variant])
    dit = build_dit(preset.dit, seed=3)
    positions = token_positions(GRID, "tass" if with_reference else None, 24.0)
    tokens = VIDEO + (REF if with_reference else 0)
    tables = rope_tables(positions, preset.dit)
    latent, timestep, context, mask = _inputs(3, tokens)
    with torch.no_grad():
        keys = torch.ones(3, tokens, dtype=torch.int64)
        # the stream's sigma: used by the prompt AdaLN (gated-adaln), else unused
        ours = dit(latent, timestep, context, mask, keys, tables.cos, tables.sin, sigma=timestep[:, 0])
        theirs = _ltx(dit, latent, timestep, positions, context, mask)
    assert ours.shape == (3, tokens, 128)
    assert (ours - theirs).abs().max().item() <= TOL


@pytest.mark.parametrize("rope_type", ["interleaved", "split"])
def test_key_mask_equals_ltx_core_attention_mask(rope_type: str) -> None:
    """The "no reference" stream: reference keys off, as ltx-core's (B, T, T) self-attention mask does."""
    preset = get_preset("tiny").with_dit(rope_type=rope_type)
    dit = build_dit(preset.dit, seed=4)
    positions = token_positions(GRID, "tass", 24.0)
    tables = rope_tables(positions, preset.dit)
    latent, timestep, context, mask = _inputs(2, VIDEO + REF, seed=1)
    keys = torch.ones(2, VIDEO + REF, dtype=torch.int64)
    keys[:, VIDEO:] = 0
    full = keys[:, None, :].expand(2, VIDEO + REF, VIDEO + REF).float()
    with torch.no_grad():
        ours = dit(latent, timestep, context, mask, keys, tables.cos, tables.sin)
        theirs = _ltx(dit, latent, timestep, positions, context, mask, attention_mask=full)
    assert (ours - theirs).abs().max().item() <= TOL


def test_no_reference_stream_equals_video_alone(tiny_models) -> None:
    """Masking reference keys gives the video tokens exactly what a run without reference gives."""
    dit, cfg = tiny_models.dit, tiny_models.preset.dit
    with_ref = rope_tables(token_positions(GRID, "tass", 24.0), cfg)
    alone = rope_tables(token_positions(GRID, None, 24.0), cfg)
    latent, timestep, context, mask = _inputs(1, VIDEO + REF, seed=2)
    keys = torch.ones(1, VIDEO + REF, dtype=torch.int64)
    keys[:, VIDEO:] = 0
    with torch.no_grad():
        masked = dit(latent, timestep, context, mask, keys, with_ref.cos, with_ref.sin)[:, :VIDEO]
        video = dit(latent[:, :VIDEO], timestep[:, :VIDEO], context, mask,
                    torch.ones(1, VIDEO, dtype=torch.int64), alone.cos, alone.sin)
    assert (masked - video).abs().max().item() <= 1e-5
    with torch.no_grad():
        unmasked = dit(latent, timestep, context, mask, torch.ones_like(keys), with_ref.cos, with_ref.sin)
    assert (unmasked[:, :VIDEO] - video).abs().max().item() > 1e-3  # the reference does matter


def test_batch_rows_are_independent(tiny_models) -> None:
    tables = rope_tables(token_positions(GRID, "tass", 24.0), tiny_models.preset.dit)
    latent, timestep, context, mask = _inputs(3, VIDEO + REF, seed=5)
    keys = torch.ones(3, VIDEO + REF, dtype=torch.int64)
    keys[0, VIDEO:] = 0
    with torch.no_grad():
        batched = tiny_models.dit(latent, timestep, context, mask, keys, tables.cos, tables.sin)
        for i in range(3):
            row = tiny_models.dit(latent[i:i + 1], timestep[i:i + 1], context[i:i + 1], mask[i:i + 1],
                                  keys[i:i + 1], tables.cos, tables.sin)
            assert (row - batched[i:i + 1]).abs().max().item() <= 1e-5


def test_seeded_init_is_deterministic_and_complete() -> None:
    cfg = get_preset("tiny").dit
    a, b = build_dit(cfg, seed=7), build_dit(cfg, seed=7)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
        assert torch.isfinite(x).all(), name  # nothing left as torch.empty garbage
    c = build_dit(cfg, seed=8)
    assert not torch.equal(a.ltx.proj_out.weight, c.ltx.proj_out.weight)
