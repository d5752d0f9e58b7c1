"""The decode-tiling grid shared by the Python (tests/runtime) and C++ (tests/cpp) placement tests.

Latent (height, width) x (tile px, overlap px): sizes that divide evenly and not, 1 to 4 tiles per axis,
wide and tall, and the 512x768 default bucket (latent 16x24) that an old placement got wrong.
"""

from __future__ import annotations

SIZES = [(2, 3), (4, 4), (16, 24), (24, 16), (16, 16), (17, 30), (9, 40), (5, 7), (12, 12), (30, 45), (3, 11),
         (8, 14)]
TILES = [(64, 0), (64, 32), (96, 32), (128, 64), (160, 32), (512, 64)]
GRID = [(h, w, t, o) for h, w in SIZES for t, o in TILES if t < 32 * max(h, w)]


def ltx_tiles(decoder, height: int, width: int, tile_px: int, overlap_px: int) -> list:
    """ltx-core's own tiles (placement and 1-D masks) for a latent of `height` x `width`."""
    import torch
    from ltx_core.model.video_vae.tiling import SpatialTilingConfig, TemporalTilingConfig, TilingConfig

    config = TilingConfig(SpatialTilingConfig(tile_px, overlap_px), TemporalTilingConfig(16, 0))
    return decoder._prepare_tiles(torch.empty((1, 128, 2, height, width), device="meta"), config)
