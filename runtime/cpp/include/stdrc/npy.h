// The .npy format (numpy's documented v1/v2/v3 header + raw C-order data), little-endian only.
// Enough for what Python and C++ exchange here: float32/float64, int32/int64, uint8, bool.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>

namespace stdrc {

// Reads `path` into a CPU tensor of the file's dtype and shape. Throws InputError on a missing
// file, a big-endian or Fortran-ordered array, an unsupported dtype or a truncated file.
at::Tensor read_npy(const std::string& path);

// numpy's name for a dtype ("float32", "int64", ...), for messages and manifest checks.
std::string dtype_name(at::ScalarType type);

// Writes a tensor (any device, any strides) as a v1.0 .npy file, under a temp name then renamed.
void write_npy(const std::string& path, const at::Tensor& tensor);

}  // namespace stdrc
