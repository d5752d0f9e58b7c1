// stdrc_tiles HEIGHT WIDTH TILE OVERLAP (latent units): the decode tiles libstdrc places, as JSON.
//
// Prints {"rows": [[start, end], ...], "cols": [...], "row_masks": [[...]], "col_masks": [[...]]} (masks in
// pixels) so that tests/cpp/test_cpp_tiling.py can compare the C++ placement with ltx-core's.
#include <iostream>
#include <string>

#include "stdrc/tiling.h"

#include <ATen/ATen.h>

namespace {

void print_spans(const std::vector<stdrc::Span>& spans) {
  std::cout << "[";
  for (size_t i = 0; i < spans.size(); ++i) std::cout << (i ? ", " : "") << "[" << spans[i].start << ", " << spans[i].end << "]";
  std::cout << "]";
}

void print_masks(const std::vector<at::Tensor>& masks) {
  std::cout << "[";
  for (size_t i = 0; i < masks.size(); ++i) {
    const at::Tensor m = masks[i].contiguous();
    std::cout << (i ? ", " : "") << "[";
    for (int64_t k = 0; k < m.numel(); ++k) std::cout << (k ? ", " : "") << m.data_ptr<float>()[k];
    std::cout << "]";
  }
  std::cout << "]";
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 5) {
    std::cerr << "error: usage: stdrc_tiles HEIGHT WIDTH TILE OVERLAP (latent units)\n";
    return 2;
  }
  stdrc::DecodeTiling tiling;
  const int64_t height = std::stoll(argv[1]), width = std::stoll(argv[2]);
  tiling.tile = std::stoll(argv[3]);
  tiling.overlap = std::stoll(argv[4]);
  const auto [rows, cols] = stdrc::tile_intervals(tiling, height, width);
  std::cout.precision(9);
  std::cout << "{\"rows\": ";
  print_spans(rows);
  std::cout << ", \"cols\": ";
  print_spans(cols);
  std::cout << ", \"row_masks\": ";
  print_masks(stdrc::axis_masks(rows, tiling.overlap, tiling.spatial_scale));
  std::cout << ", \"col_masks\": ";
  print_masks(stdrc::axis_masks(cols, tiling.overlap, tiling.spatial_scale));
  std::cout << "}\n";
  return 0;
}
