// Spatially tiled VAE decode: the C++ twin of stdrc/runtime/tiling.py, placed and blended exactly as
// ltx-core's `VideoDecoder.tiled_decode` (tests/cpp/test_cpp_tiling.py checks a grid against ltx-core).
//
// The tile is scaled to each axis (round(tile * axis / long_side), half to even, at least
// max(2, overlap + 1)); tiles start every tile - overlap latents and the last one ends at the edge,
// so the decoder engine takes a dynamic tile height/width. Linear ramps of `overlap` across each
// seam, weights normalised. Time is not tiled.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <utility>
#include <vector>

namespace stdrc {

// Tile on the long side and overlap in latent units (manifest "decode", placement "ltx-core");
// tile == 0 means "decode the whole latent".
struct DecodeTiling {
  int64_t tile = 0, overlap = 0, spatial_scale = 32;
  bool enabled() const { return tile > 0; }
};

struct Span {
  int64_t start = 0, end = 0;  // [start, end) in latent units
};

// ltx-core `split_with_symmetric_overlaps`.
std::vector<Span> axis_intervals(int64_t length, int64_t size, int64_t overlap);

// Rows and columns of the tiles of a height x width latent.
std::pair<std::vector<Span>, std::vector<Span>> tile_intervals(const DecodeTiling& tiling, int64_t height,
                                                               int64_t width);

// ltx-core `compute_trapezoidal_mask_1d` (float32): 1 inside, linear fades over the ramps.
at::Tensor ramp_mask(int64_t length, int64_t left, int64_t right);

// Per tile of one axis, its blend mask in pixels.
std::vector<at::Tensor> axis_masks(const std::vector<Span>& spans, int64_t overlap, int64_t scale);

// [1, C, F, H, W] latent -> [1, 3, frames, H * scale, W * scale], one `decode_tile` call per tile.
at::Tensor tiled_decode(const std::function<at::Tensor(const at::Tensor&)>& decode_tile, const at::Tensor& latent,
                        const DecodeTiling& tiling);

}  // namespace stdrc
