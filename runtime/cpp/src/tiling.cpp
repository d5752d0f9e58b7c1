#include "stdrc/tiling.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>

namespace stdrc {

std::vector<Span> axis_intervals(int64_t length, int64_t size, int64_t overlap) {
  if (length <= size) return {{0, length}};
  const int64_t step = size - overlap;
  const int64_t count = (length + size - 2 * overlap - 1) / step;
  std::vector<Span> spans;
  for (int64_t i = 0; i < count; ++i) spans.push_back({i * step, i + 1 < count ? i * step + size : length});
  return spans;
}

namespace {

// ltx-core `_prepare_tiles`: Python's round() of a true division, i.e. half to even (nearbyint's default mode).
int64_t axis_tile_size(const DecodeTiling& tiling, int64_t length, int64_t long_side) {
  const double scaled = static_cast<double>(tiling.tile * length) / static_cast<double>(long_side);
  return std::max(std::max<int64_t>(2, tiling.overlap + 1), static_cast<int64_t>(std::nearbyint(scaled)));
}

}  // namespace

std::pair<std::vector<Span>, std::vector<Span>> tile_intervals(const DecodeTiling& tiling, int64_t height,
                                                               int64_t width) {
  const int64_t long_side = std::max(height, width);
  return {axis_intervals(height, axis_tile_size(tiling, height, long_side), tiling.overlap),
          axis_intervals(width, axis_tile_size(tiling, width, long_side), tiling.overlap)};
}

// float32 like the Python twin: fades from a float32 linspace, products in float32.
at::Tensor ramp_mask(int64_t length, int64_t left, int64_t right) {
  at::Tensor mask = at::ones({length}, at::kFloat);
  left = std::min(left, length);
  right = std::min(right, length);
  if (left > 0) mask.narrow(0, 0, left).mul_(at::linspace(0.0, 1.0, left + 2, at::kFloat).narrow(0, 1, left));
  if (right > 0)
    mask.narrow(0, length - right, right).mul_(at::linspace(1.0, 0.0, right + 2, at::kFloat).narrow(0, 1, right));
  return mask;
}

std::vector<at::Tensor> axis_masks(const std::vector<Span>& spans, int64_t overlap, int64_t scale) {
  std::vector<at::Tensor> masks;
  for (size_t i = 0; i < spans.size(); ++i)
    masks.push_back(ramp_mask((spans[i].end - spans[i].start) * scale, i > 0 ? overlap * scale : 0,
                              i + 1 < spans.size() ? overlap * scale : 0));
  return masks;
}

at::Tensor tiled_decode(const std::function<at::Tensor(const at::Tensor&)>& decode_tile, const at::Tensor& latent,
                        const DecodeTiling& tiling) {
  const int64_t height = latent.size(3), width = latent.size(4), scale = tiling.spatial_scale;
  const auto [rows, cols] = tile_intervals(tiling, height, width);
  const auto row_masks = axis_masks(rows, tiling.overlap, scale), col_masks = axis_masks(cols, tiling.overlap, scale);
  at::Tensor video, weights;
  for (size_t i = 0; i < rows.size(); ++i) {
    const int64_t r = rows[i].start, th = rows[i].end - rows[i].start;
    for (size_t j = 0; j < cols.size(); ++j) {
      const int64_t c = cols[j].start, tw = cols[j].end - cols[j].start;
      const at::Tensor tile = decode_tile(latent.narrow(3, r, th).narrow(4, c, tw).contiguous()).to(at::kFloat);
      if (!video.defined()) {
        video = at::zeros({tile.size(0), tile.size(1), tile.size(2), height * scale, width * scale}, tile.options());
        weights = at::zeros({height * scale, width * scale}, tile.options());
      }
      const at::Tensor mask = (row_masks[i].unsqueeze(1) * col_masks[j].unsqueeze(0)).to(tile.device());
      video.narrow(3, r * scale, th * scale).narrow(4, c * scale, tw * scale).add_(tile * mask);
      weights.narrow(0, r * scale, th * scale).narrow(1, c * scale, tw * scale).add_(mask);
    }
  }
  return video / weights.clamp_min(1e-8);
}

}  // namespace stdrc
