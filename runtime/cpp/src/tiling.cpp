#include "stdrc/tiling.h"

#include <ATen/ATen.h>

#include <algorithm>

namespace stdrc {

std::vector<int64_t> tile_starts(int64_t length, int64_t size, int64_t overlap) {
  if (size >= length) return {0};
  const int64_t step = size - overlap;
  const int64_t count = (length - overlap + step - 1) / step;
  std::vector<int64_t> starts;
  for (int64_t i = 0; i < count; ++i)  // round half up, in integers, as the Python twin does
    starts.push_back((2 * i * (length - size) + count - 1) / (2 * (count - 1)));
  return starts;
}

namespace {

// float32 like the Python twin: values from a float64 linspace, products in float32.
at::Tensor ramp_mask(int64_t size, int64_t left, int64_t right) {
  at::Tensor mask = at::ones({size}, at::kFloat);
  if (left > 0)
    mask.narrow(0, 0, left).copy_(at::linspace(0.0, 1.0, left + 2, at::kDouble).narrow(0, 1, left).to(at::kFloat));
  if (right > 0)
    mask.narrow(0, size - right, right)
        .mul_(at::linspace(1.0, 0.0, right + 2, at::kDouble).narrow(0, 1, right).to(at::kFloat));
  return mask;
}

std::vector<at::Tensor> axis_masks(const std::vector<int64_t>& starts, int64_t size, int64_t scale) {
  std::vector<at::Tensor> masks;
  for (size_t i = 0; i < starts.size(); ++i) {
    const int64_t left = i > 0 ? starts[i - 1] + size - starts[i] : 0;
    const int64_t right = i + 1 < starts.size() ? starts[i] + size - starts[i + 1] : 0;
    masks.push_back(ramp_mask(size * scale, left * scale, right * scale));
  }
  return masks;
}

}  // namespace

at::Tensor tiled_decode(const std::function<at::Tensor(const at::Tensor&)>& decode_tile, const at::Tensor& latent,
                        const DecodeTiling& tiling) {
  const int64_t height = latent.size(3), width = latent.size(4), scale = tiling.spatial_scale;
  const int64_t th = std::min(tiling.tile_height, height), tw = std::min(tiling.tile_width, width);
  const auto rows = tile_starts(height, th, tiling.overlap), cols = tile_starts(width, tw, tiling.overlap);
  const auto row_masks = axis_masks(rows, th, scale), col_masks = axis_masks(cols, tw, scale);
  at::Tensor video, weights;
  for (size_t i = 0; i < rows.size(); ++i) {
    for (size_t j = 0; j < cols.size(); ++j) {
      const at::Tensor tile =
          decode_tile(latent.narrow(3, rows[i], th).narrow(4, cols[j], tw).contiguous()).to(at::kFloat);
      if (!video.defined()) {
        video = at::zeros({tile.size(0), tile.size(1), tile.size(2), height * scale, width * scale}, tile.options());
        weights = at::zeros({height * scale, width * scale}, tile.options());
      }
      const at::Tensor mask = (row_masks[i].unsqueeze(1) * col_masks[j].unsqueeze(0)).to(tile.device());
      video.narrow(3, rows[i] * scale, th * scale).narrow(4, cols[j] * scale, tw * scale).add_(tile * mask);
      weights.narrow(0, rows[i] * scale, th * scale).narrow(1, cols[j] * scale, tw * scale).add_(mask);
    }
  }
  return video / weights;
}

}  // namespace stdrc
