"""Latent in-context reference: token sequence, per-token timesteps and positions per layout.

TASS-RoPE (DESIGN.md §1): video token (t, i, j) keeps its position; reference token (0, i, j)
takes latent coordinates (T, H + i, W + j). Both go through ltx-core's latent->pixel conversion.
"""

from __future__ import annotations

import torch
from ltx_core.components.patchifiers import VideoLatentPatchifier, get_pixel_coords
from ltx_core.types import SpatioTemporalScaleFactors, VideoLatentShape

from stdrc.runtime.vocab import LAYOUTS

_SCALE = SpatioTemporalScaleFactors.default()


def latent_bounds(frames: int, height: int, width: int) -> torch.Tensor:
    """ltx-core's [start, end) latent bounds for a grid, shape (1, 3, f*h*w, 2)."""
    shape = VideoLatentShape(batch=1, channels=1, frames=frames, height=height, width=width)
    return VideoLatentPatchifier(patch_size=1).get_patch_grid_bounds(shape)


def reference_offset(layout: str, grid: tuple[int, int, int]) -> tuple[int, int, int]:
    """Latent (t, i, j) offset of the reference block for a video grid (T, H, W)."""
    t, h, w = grid
    offsets = {
        "tass": (t, h, w),
        "overlap": (0, 0, 0),
        "width_shift": (t, 0, w),
        "before": (-1, 0, 0),
    }
    if layout not in offsets:
        raise ValueError(f"unknown reference layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
    return offsets[layout]


def latent_coordinates(grid: tuple[int, int, int], layout: str | None) -> torch.Tensor:
    """Latent bounds of the video tokens, then (if a layout is given) the reference tokens."""
    t, h, w = grid
    video = latent_bounds(t, h, w)
    if layout is None:
        return video
    ref = latent_bounds(1, h, w)
    offset = torch.tensor(reference_offset(layout, grid), dtype=ref.dtype).view(1, 3, 1, 1)
    return torch.cat([video, ref + offset], dim=2)


def token_positions(grid: tuple[int, int, int], layout: str | None, fps: float) -> torch.Tensor:
    """Pixel-space positions (1, 3, N, 2) exactly as ltx-core's `VideoLatentTools` builds them."""
    pixel = get_pixel_coords(latent_coordinates(grid, layout), _SCALE, causal_fix=True).float()
    pixel[:, 0, ...] = pixel[:, 0, ...] / fps
    return pixel


def reference_timesteps(sigma: torch.Tensor, video_tokens: int, reference_tokens: int) -> torch.Tensor:
    """Per-token timestep (B, N): sigma on video tokens, 0 on the clean reference tokens."""
    sigma = sigma.reshape(-1, 1).float()
    video = sigma.expand(-1, video_tokens)
    ref = torch.zeros(sigma.shape[0], reference_tokens, dtype=sigma.dtype)
    return torch.cat([video, ref], dim=1)


def build_sequence(video_latent: torch.Tensor, reference_latent: torch.Tensor) -> torch.Tensor:
    """(B, C, T, H, W) video and (B, C, 1, H, W) reference -> (B, N, C) tokens, video first."""
    patchifier = VideoLatentPatchifier(patch_size=1)
    return torch.cat([patchifier.patchify(video_latent), patchifier.patchify(reference_latent)], dim=1)
