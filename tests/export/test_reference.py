"""Reference layouts and TASS-RoPE positions (DESIGN.md §1)."""

from __future__ import annotations

import pytest
import torch
from ltx_core.components.patchifiers import VideoLatentPatchifier
from ltx_core.tools import VideoLatentTools
from ltx_core.types import VideoLatentShape

from stdrc.export.reference import (
    LAYOUTS,
    build_sequence,
    latent_coordinates,
    reference_offset,
    reference_timesteps,
    token_positions,
)


def _cells(coords: torch.Tensor) -> set[tuple[int, int, int]]:
    starts = coords[0, :, :, 0].T.tolist()
    return {tuple(int(v) for v in s) for s in starts}


def test_tass_worked_example() -> None:
    """Video grid h=3, w=4: reference rows 3..5, columns 4..7, at temporal index T."""
    t, h, w = 2, 3, 4
    coords = latent_coordinates((t, h, w), "tass")
    ref = coords[0, :, t * h * w:, 0]
    assert set(ref[0].tolist()) == {t}
    assert sorted(set(ref[1].tolist())) == [3, 4, 5]
    assert sorted(set(ref[2].tolist())) == [4, 5, 6, 7]
    assert ref.shape[1] == h * w


@pytest.mark.parametrize("layout,overlaps", [("tass", False), ("width_shift", False), ("before", False),
                                             ("overlap", True)])
def test_reference_block_overlap(layout: str, overlaps: bool) -> None:
    grid = (3, 2, 5)
    coords = latent_coordinates(grid, layout)
    n = grid[0] * grid[1] * grid[2]
    video, ref = _cells(coords[:, :, :n]), _cells(coords[:, :, n:])
    assert len(ref) == grid[1] * grid[2]
    assert bool(video & ref) is overlaps


@pytest.mark.parametrize("layout,expected", [("tass", (4, 2, 3)), ("overlap", (0, 0, 0)),
                                             ("width_shift", (4, 0, 3)), ("before", (-1, 0, 0))])
def test_layout_offsets(layout: str, expected: tuple[int, int, int]) -> None:
    assert reference_offset(layout, (4, 2, 3)) == expected


def test_unknown_layout() -> None:
    with pytest.raises(ValueError, match="choose one of"):
        reference_offset("diagonal", (1, 1, 1))
    assert set(LAYOUTS) == {"tass", "overlap", "width_shift", "before"}


def test_video_positions_equal_ltx_core_latent_tools() -> None:
    shape = VideoLatentShape(batch=1, channels=128, frames=3, height=2, width=4)
    tools = VideoLatentTools(VideoLatentPatchifier(1), shape, fps=25.0)
    state = tools.create_initial_state(device="cpu", dtype=torch.float32)
    ours = token_positions((3, 2, 4), "tass", 25.0)
    assert torch.equal(ours[:, :, : 3 * 2 * 4], state.positions)


def test_tass_reference_positions_follow_the_same_conversion() -> None:
    t, h, w = 2, 2, 3
    pos = token_positions((t, h, w), "tass", 24.0)[0, :, t * h * w:]
    # time: causal fix (start*8 + 1 - 8, clamped) then / fps; space: latent * 32
    assert torch.allclose(pos[0, :, 0], torch.full((h * w,), (t * 8 + 1 - 8) / 24.0))
    assert sorted(set(pos[1, :, 0].tolist())) == [32.0 * (h + i) for i in range(h)]
    assert sorted(set(pos[2, :, 0].tolist())) == [32.0 * (w + j) for j in range(w)]


def test_reference_timesteps_are_zero() -> None:
    ts = reference_timesteps(torch.tensor([0.7, 0.2]), 6, 2)
    assert ts.shape == (2, 8)
    assert torch.all(ts[:, 6:] == 0)
    assert torch.allclose(ts[1, :6], torch.full((6,), 0.2))


def test_build_sequence_puts_video_first() -> None:
    video = torch.randn(1, 128, 2, 2, 3)
    ref = torch.randn(1, 128, 1, 2, 3)
    seq = build_sequence(video, ref)
    assert seq.shape == (1, 12 + 6, 128)
    assert torch.equal(seq[0, 0], video[0, :, 0, 0, 0])
    assert torch.equal(seq[0, 12], ref[0, :, 0, 0, 0])
