"""The C++ decode tile placement (`stdrc_tiles`, runtime/cpp/src/tiling.cpp) against ltx-core's, on a grid."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from tiling_cases import GRID, ltx_tiles  # tests/tiling_cases.py: one grid for Python and C++

pytestmark = pytest.mark.slow  # a libtorch C++ build


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
