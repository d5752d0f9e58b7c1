// The safetensors format (an 8-byte little-endian header length, a JSON header of name -> dtype, shape,
// data_offsets, then raw little-endian data): the constants an aoti package compiled without them is given.
#pragma once

#include <ATen/core/Tensor.h>

#include <map>
#include <string>

namespace stdrc {

// Every tensor of `path` as a CPU tensor of the file's dtype (F32, F16, BF16, F64, I64, I32) and shape.
// Throws BundleError on a missing, truncated or malformed file.
std::map<std::string, at::Tensor> read_safetensors(const std::string& path);

}  // namespace stdrc
