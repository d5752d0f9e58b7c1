// Spatially tiled VAE decode: the C++ twin of stdrc/runtime/tiling.py (same tiles, same blend).
//
// A bundle built with a decode tile holds a decoder engine of tile size; the latent is decoded
// tile by tile and blended with linear ramps across each overlap, weights normalised.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <vector>

namespace stdrc {

// Tile size and minimum overlap in latent units; tile_height == 0 means "decode the whole latent".
struct DecodeTiling {
  int64_t tile_height = 0, tile_width = 0, overlap = 0, spatial_scale = 32;
  bool enabled() const { return tile_height > 0; }
};

// Evenly spaced starts of equal tiles covering [0, length), neighbours overlapping by >= overlap.
std::vector<int64_t> tile_starts(int64_t length, int64_t size, int64_t overlap);

// [1, C, F, H, W] latent -> [1, 3, frames, H * scale, W * scale], one `decode_tile` call per tile.
at::Tensor tiled_decode(const std::function<at::Tensor(const at::Tensor&)>& decode_tile, const at::Tensor& latent,
                        const DecodeTiling& tiling);

}  // namespace stdrc
