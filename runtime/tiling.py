"""Spatially tiled VAE decode: a bucket-static decoder engine built at tile size, run per tile and blended.

Large buckets would need the decoder's activations for the whole frame at once; a tile-sized
engine bounds that memory. Tiles are all one size (one static engine), spaced evenly with at
least the requested overlap, and blended as ltx-core's `tiled_decode` blends them: linear ramps
across each overlap, weights normalised. Time is not tiled (the decoder is causal in time).
Torch-free: numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from stdrc.runtime.errors import InputError
from stdrc.runtime.manifest import SPACE_SCALE


@dataclass(frozen=True)
class DecodeTiling:
    """Tile size and minimum overlap in latent units (x 32 pixels)."""

    tile_height: int
    tile_width: int
    overlap: int

    def to_json(self) -> dict[str, int]:
        return {"tile_height": self.tile_height, "tile_width": self.tile_width, "overlap": self.overlap,
                "spatial_scale": SPACE_SCALE}

    @staticmethod
    def from_json(data: dict) -> DecodeTiling | None:
        if not data:
            return None
        return DecodeTiling(int(data["tile_height"]), int(data["tile_width"]), int(data["overlap"]))


def decode_tiling(height: int, width: int, tile_px: int | None, overlap_px: int) -> DecodeTiling | None:
    """Tiling for a bucket, or None when one tile would cover it. `tile_px` None = 512 above 512 pixels."""
    if tile_px is None:
        tile_px = 512 if max(height, width) > 512 else 0
    if tile_px == 0:
        return None
    if tile_px % SPACE_SCALE or tile_px < 2 * SPACE_SCALE:
        raise InputError(f"decode tile {tile_px} px must be a multiple of {SPACE_SCALE} and >= 64: pick e.g. 512")
    if overlap_px % SPACE_SCALE or not 0 <= overlap_px < tile_px:
        raise InputError(
            f"decode overlap {overlap_px} px must be a multiple of {SPACE_SCALE} below the tile ({tile_px} px): "
            "pick e.g. 64"
        )
    if tile_px >= max(height, width):
        return None
    tile = tile_px // SPACE_SCALE
    return DecodeTiling(min(tile, height // SPACE_SCALE), min(tile, width // SPACE_SCALE), overlap_px // SPACE_SCALE)


def tile_starts(length: int, size: int, overlap: int) -> list[int]:
    """Evenly spaced starts of equal tiles covering [0, length), neighbours overlapping by >= `overlap`."""
    if size >= length:
        return [0]
    count = math.ceil((length - overlap) / (size - overlap))
    # round half up, in integers: the C++ runner (runtime/cpp/src/tiling.cpp) places the same tiles
    return [(2 * i * (length - size) + count - 1) // (2 * (count - 1)) for i in range(count)]


def _ramp_mask(size: int, left: int, right: int) -> np.ndarray:
    """1 inside, linear fades over the overlaps; complementary fades of one overlap sum to 1."""
    mask = np.ones(size, np.float32)
    if left:
        mask[:left] = np.linspace(0.0, 1.0, left + 2, dtype=np.float32)[1:-1]
    if right:
        mask[size - right:] *= np.linspace(1.0, 0.0, right + 2, dtype=np.float32)[1:-1]
    return mask


def _axis_masks(starts: list[int], size: int, scale: int) -> list[np.ndarray]:
    masks = []
    for i, start in enumerate(starts):
        left = starts[i - 1] + size - start if i > 0 else 0
        right = start + size - starts[i + 1] if i + 1 < len(starts) else 0
        masks.append(_ramp_mask(size * scale, left * scale, right * scale))
    return masks


def tiled_decode(decode_tile: Callable[[np.ndarray], np.ndarray], latent: np.ndarray,
                 tiling: DecodeTiling, scale: int = SPACE_SCALE) -> np.ndarray:
    """[1, C, F, H, W] latent -> [1, 3, frames, H*scale, W*scale] video, one `decode_tile` call per tile."""
    _, _, _, height, width = latent.shape
    th, tw = min(tiling.tile_height, height), min(tiling.tile_width, width)
    rows, cols = tile_starts(height, th, tiling.overlap), tile_starts(width, tw, tiling.overlap)
    row_masks, col_masks = _axis_masks(rows, th, scale), _axis_masks(cols, tw, scale)
    video = weights = None
    for r, row_mask in zip(rows, row_masks):
        for c, col_mask in zip(cols, col_masks):
            tile = decode_tile(np.ascontiguousarray(latent[..., r:r + th, c:c + tw]))
            if video is None:
                video = np.zeros((*tile.shape[:3], height * scale, width * scale), np.float32)
                weights = np.zeros((height * scale, width * scale), np.float32)
            mask = row_mask[:, None] * col_mask[None, :]
            ys, xs = slice(r * scale, (r + th) * scale), slice(c * scale, (c + tw) * scale)
            video[..., ys, xs] += tile * mask
            weights[ys, xs] += mask
    return video / weights
