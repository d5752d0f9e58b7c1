"""The C++ decode tile placement (`stdrc_tiles`, runtime/cpp/src/tiling.cpp) against ltx-core's, on a grid."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # a libtorch C++ build

# the grid of tests/runtime/test_tiling.py: 1 to 4 tiles per axis, dividing evenly and not, the 512x768 default
SIZES = [(2, 3), (4, 4), (16, 24), (24, 16), (16, 16), (17, 30), (9, 40), (5, 7), (12, 12), (30, 45), (3, 11),
         (8, 14)]
TILES = [(64, 0), (64, 32), (96, 32), (128, 64), (160, 32), (512, 64)]
GRID = [(h, w, t, o) for h, w in SIZES for t, o in TILES if t < 32 * max(h, w)]


def ltx_tiles(decoder, height: int, width: int, tile_px: int, overlap_px: int) -> list:
    import torch
    from ltx_core.model.video_vae.tiling import SpatialTilingConfig, TemporalTilingConfig, TilingConfig

    config = TilingConfig(SpatialTilingConfig(tile_px, overlap_px), TemporalTilingConfig(16, 0))
    return decoder._prepare_tiles(torch.empty((1, 128, 2, height, width), device="meta"), config)


@pytest.mark.parametrize("height, width, tile_px, overlap_px", GRID)
def test_cpp_placement_and_masks_match_ltx_core(cpp_tiles: Path, tiny_models, height: int, width: int,
                                                tile_px: int, overlap_px: int) -> None:
    done = subprocess.run([str(cpp_tiles), str(height), str(width), str(tile_px // 32), str(overlap_px // 32)],
                          check=True, capture_output=True, text=True, timeout=60)
    cpp = json.loads(done.stdout)
    theirs = ltx_tiles(tiny_models.vae_decoder, height, width, tile_px, overlap_px)
    assert len(theirs) == len(cpp["rows"]) * len(cpp["cols"])
    ours = [(r, c, rm, cm) for r, rm in zip(cpp["rows"], cpp["row_masks"])
            for c, cm in zip(cpp["cols"], cpp["col_masks"])]
    for (r, c, rm, cm), tile in zip(ours, theirs):
        assert [tile.in_coords[3].start, tile.in_coords[3].stop] == r
        assert [tile.in_coords[4].start, tile.in_coords[4].stop] == c
        np.testing.assert_allclose(rm, tile.masks_1d[3].numpy(), atol=1e-6)
        np.testing.assert_allclose(cm, tile.masks_1d[4].numpy(), atol=1e-6)
