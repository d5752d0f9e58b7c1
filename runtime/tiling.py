"""Spatially tiled VAE decode, placed and blended exactly as ltx-core's `VideoDecoder.tiled_decode`.

Large buckets would need the decoder's activations for the whole frame at once; tiles bound that
memory. ltx-core scales the tile to each axis (`round(tile * axis / long_side)`, at least
`max(2, overlap + 1)`), starts tiles every `tile - overlap` latents and cuts the last one at the
edge, so a bucket has at most two tile lengths per axis: the decoder engine takes a dynamic
tile height/width over that range (`decoder_tile_dims`). Blending: linear ramps of `overlap`
across each seam, weights normalised. Time is not tiled (the decoder is causal in time).
Torch-free: numpy only; runtime/cpp/src/tiling.cpp is the C++ twin.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from stdrc.runtime import schema as sc
from stdrc.runtime.errors import BundleError, InputError
from stdrc.runtime.schema import SPACE_SCALE, spec

PLACEMENT = "ltx-core"  # manifest "decode" tilings without it (equal tiles spread evenly) are refused


def placement(data: dict, key: str, where: str) -> str:
    if data.get(key) != PLACEMENT:
        raise BundleError("this bundle's decode tiles predate ltx-core's tile placement: rebuild it with "
                          "stdrc-export build-engines")
    return PLACEMENT


@dataclass(frozen=True)
class DecodeTiling(sc.Section):
    """ltx-core's `SpatialTilingConfig` in latent units (x 32 pixels): tile on the long side, overlap.

    The manifest's `decode` section; `{}` there (None here) decodes the whole latent at once."""

    placement: str = spec(placement, PLACEMENT, required=True, kw_only=True)
    tile: int = spec(sc.integer, lo=1)
    overlap: int = spec(sc.integer, lo=0)
    spatial_scale: int = spec(sc.integer, SPACE_SCALE, required=True, kw_only=True, lo=SPACE_SCALE, hi=SPACE_SCALE)

    def axis_size(self, length: int, long_side: int) -> int:
        """ltx-core `_prepare_tiles.enable_on_axis`: the tile scaled to this axis (Python's round: half to even)."""
        return max(max(2, self.overlap + 1), round(self.tile * length / long_side))

    def intervals(self, height: int, width: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """[start, end) latent rows and columns of the tiles of a height x width latent."""
        long_side = max(height, width)
        return (axis_intervals(height, self.axis_size(height, long_side), self.overlap),
                axis_intervals(width, self.axis_size(width, long_side), self.overlap))


def axis_intervals(length: int, size: int, overlap: int) -> list[tuple[int, int]]:
    """ltx-core `split_with_symmetric_overlaps`: starts every size - overlap, the last tile ends at `length`."""
    if length <= size:
        return [(0, length)]
    count = (length + size - 2 * overlap - 1) // (size - overlap)
    starts = [i * (size - overlap) for i in range(count)]
    return [(s, s + size) for s in starts[:-1]] + [(starts[-1], length)]


def decoder_tile_dims(tiling: DecodeTiling, height: int, width: int) -> dict[str, list[int]]:
    """min/opt/max tile height and width (latent units) over this latent's tiles, for the decoder engine."""
    rows, cols = tiling.intervals(height, width)
    dims = {}
    for name, spans in (("tile_height", rows), ("tile_width", cols)):
        sizes = [b - a for a, b in spans]
        dims[name] = [min(sizes), max(sizes), max(sizes)]
    return dims


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
    tiling = DecodeTiling(tile_px // SPACE_SCALE, overlap_px // SPACE_SCALE)
    dims = decoder_tile_dims(tiling, height // SPACE_SCALE, width // SPACE_SCALE)
    if min(dims["tile_height"][0], dims["tile_width"][0]) < 2:  # the VAE's reflect padding needs 2 latents
        raise InputError(f"decode tile {tile_px} px with overlap {overlap_px} px leaves a 32 px tile at the "
                         f"{height}x{width} edge: pick e.g. overlap {overlap_px + SPACE_SCALE}")
    return tiling


def ramp_mask(length: int, left: int, right: int) -> np.ndarray:
    """ltx-core `compute_trapezoidal_mask_1d`: 1 inside, linear fades (ends excluded) over the ramps."""
    mask = np.ones(length, np.float32)
    left, right = min(left, length), min(right, length)
    if left:
        mask[:left] *= np.linspace(0.0, 1.0, left + 2, dtype=np.float32)[1:-1]
    if right:
        mask[length - right:] *= np.linspace(1.0, 0.0, right + 2, dtype=np.float32)[1:-1]
    return mask


def axis_masks(spans: list[tuple[int, int]], overlap: int, scale: int) -> list[np.ndarray]:
    """Per tile, its blend mask in pixels: ramps of `overlap` on every side that meets a neighbour."""
    last = len(spans) - 1
    return [ramp_mask((b - a) * scale, overlap * scale if i else 0, overlap * scale if i < last else 0)
            for i, (a, b) in enumerate(spans)]


def tiled_decode(decode_tile: Callable[[np.ndarray], np.ndarray], latent: np.ndarray,
                 tiling: DecodeTiling, scale: int = SPACE_SCALE) -> np.ndarray:
    """[1, C, F, H, W] latent -> [1, 3, frames, H*scale, W*scale] video, one `decode_tile` call per tile."""
    _, _, _, height, width = latent.shape
    rows, cols = tiling.intervals(height, width)
    row_masks, col_masks = axis_masks(rows, tiling.overlap, scale), axis_masks(cols, tiling.overlap, scale)
    video = weights = None
    for (r0, r1), row_mask in zip(rows, row_masks):
        for (c0, c1), col_mask in zip(cols, col_masks):
            tile = decode_tile(np.ascontiguousarray(latent[..., r0:r1, c0:c1]))
            if video is None:
                video = np.zeros((*tile.shape[:3], height * scale, width * scale), np.float32)
                weights = np.zeros((height * scale, width * scale), np.float32)
            mask = row_mask[:, None] * col_mask[None, :]
            ys, xs = slice(r0 * scale, r1 * scale), slice(c0 * scale, c1 * scale)
            video[..., ys, xs] += tile * mask
            weights[ys, xs] += mask
    return video / np.maximum(weights, 1e-8)
