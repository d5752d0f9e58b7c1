#include "stdrc/safetensors.h"

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include <cstring>
#include <fstream>
#include <iterator>
#include <vector>

#include "stdrc/errors.h"

namespace stdrc {
namespace {

at::ScalarType scalar_type(const std::string& name, const std::string& path) {
  static const std::map<std::string, at::ScalarType> types = {
      {"F32", at::kFloat}, {"F16", at::kHalf}, {"BF16", at::kBFloat16}, {"F64", at::kDouble},
      {"I64", at::kLong},  {"I32", at::kInt}};
  const auto it = types.find(name);
  if (it == types.end()) throw BundleError(path + " holds a " + name + " tensor, which this runner does not read: rebuild the bundle");
  return it->second;
}

}  // namespace

std::map<std::string, at::Tensor> read_safetensors(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw BundleError(path + " is missing: rebuild the bundle");
  const std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  uint64_t header = 0;
  if (bytes.size() < 8) throw BundleError(path + " is truncated: rebuild the bundle");
  std::memcpy(&header, bytes.data(), 8);  // little-endian, as this runner's hosts are
  if (header > bytes.size() - 8) throw BundleError(path + " is truncated: rebuild the bundle");
  const size_t data = 8 + header;
  std::map<std::string, at::Tensor> out;
  try {
    const auto meta = nlohmann::json::parse(bytes.begin() + 8, bytes.begin() + static_cast<std::ptrdiff_t>(data));
    for (const auto& [name, t] : meta.items()) {
      if (name == "__metadata__") continue;
      const auto type = scalar_type(t.at("dtype").get<std::string>(), path);
      const auto shape = t.at("shape").get<std::vector<int64_t>>();
      const auto span = t.at("data_offsets").get<std::vector<uint64_t>>();
      at::Tensor tensor = at::empty(shape, at::TensorOptions().dtype(type));
      const uint64_t nbytes = tensor.numel() * tensor.element_size();
      if (span.size() != 2 || span[0] > span[1] || span[1] - span[0] != nbytes || span[1] > bytes.size() - data)
        throw BundleError(path + ": tensor " + name + " has offsets that do not fit its shape or the file: rebuild the bundle");
      std::memcpy(tensor.data_ptr(), bytes.data() + data + span[0], nbytes);
      out.emplace(name, tensor);
    }
  } catch (const nlohmann::json::exception& e) {
    throw BundleError(path + " has a malformed header (" + std::string(e.what()) + "): rebuild the bundle");
  }
  return out;
}

}  // namespace stdrc
