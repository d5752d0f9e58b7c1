#include "stdrc/npy.h"

#include <ATen/ops/empty.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>
#include <vector>

#include "stdrc/errors.h"

namespace stdrc {
namespace {

constexpr char kMagic[] = "\x93NUMPY";

struct DtypeName {
  const char* descr;
  at::ScalarType type;
  const char* name;
};
// '|' (no byte order) is what numpy writes for one-byte types; '<' for little-endian ones.
constexpr DtypeName kDtypes[] = {
    {"<f4", at::kFloat, "float32"}, {"<f8", at::kDouble, "float64"}, {"<i4", at::kInt, "int32"},
    {"<i8", at::kLong, "int64"},    {"|u1", at::kByte, "uint8"},     {"|b1", at::kBool, "bool"},
    {"<f2", at::kHalf, "float16"},
};

// The value after `'key':` in numpy's header dict, up to the next top-level ',' or '}'.
std::string header_value(const std::string& header, const std::string& key, const std::string& path) {
  auto at = header.find("'" + key + "'");
  if (at == std::string::npos) throw InputError(path + " has no '" + key + "' in its .npy header: rewrite it with numpy.save");
  at = header.find(':', at) + 1;
  while (at < header.size() && header[at] == ' ') ++at;
  size_t end = at;
  if (header[at] == '(') {
    end = header.find(')', at) + 1;
  } else {
    while (end < header.size() && header[end] != ',' && header[end] != '}') ++end;
  }
  return header.substr(at, end - at);
}

std::vector<int64_t> parse_shape(const std::string& text, const std::string& path) {
  std::vector<int64_t> shape;
  std::string inner = text.substr(1, text.size() - 2);  // strip ( )
  std::stringstream items(inner);
  std::string item;
  while (std::getline(items, item, ',')) {
    if (item.find_first_not_of(' ') == std::string::npos) continue;
    try {
      shape.push_back(std::stoll(item));
    } catch (const std::exception&) {
      throw InputError(path + " has a malformed shape " + text + " in its .npy header");
    }
  }
  return shape;
}

std::string descr_of(at::ScalarType type) {
  for (const auto& d : kDtypes)
    if (d.type == type) return d.descr;
  throw InputError(std::string("cannot write dtype ") + c10::toString(type) + " to .npy");
}

}  // namespace

std::string dtype_name(at::ScalarType type) {
  for (const auto& d : kDtypes)
    if (d.type == type) return d.name;
  return c10::toString(type);
}

at::Tensor read_npy(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw InputError("input file " + path + " is missing or unreadable: write it with stdrc.runtime.cpp_inputs");
  char magic[6];
  unsigned char version[2];
  in.read(magic, 6);
  in.read(reinterpret_cast<char*>(version), 2);
  if (!in || std::memcmp(magic, kMagic, 6) != 0) throw InputError(path + " is not an .npy file: write it with numpy.save");
  uint32_t header_len = 0;
  if (version[0] == 1) {
    unsigned char b[2];
    in.read(reinterpret_cast<char*>(b), 2);
    header_len = b[0] | (b[1] << 8);
  } else {
    unsigned char b[4];
    in.read(reinterpret_cast<char*>(b), 4);
    header_len = b[0] | (b[1] << 8) | (b[2] << 16) | (static_cast<uint32_t>(b[3]) << 24);
  }
  std::string header(header_len, '\0');
  in.read(header.data(), header_len);
  if (!in) throw InputError(path + " has a truncated .npy header");

  std::string descr = header_value(header, "descr", path);
  descr = descr.substr(1, descr.size() - 2);  // strip quotes
  if (descr.size() == 3 && descr[0] == '=') descr[0] = '<';
  if (descr.size() == 3 && descr[1] == 'u' && descr[2] == '1') descr[0] = '|';
  if (descr.size() == 3 && descr[1] == 'b' && descr[2] == '1') descr[0] = '|';
  const DtypeName* dtype = nullptr;
  for (const auto& d : kDtypes)
    if (descr == d.descr) dtype = &d;
  if (dtype == nullptr)
    throw InputError(path + " holds dtype '" + descr + "', which this reader does not take (little-endian float/int/uint8/bool)");
  if (header_value(header, "fortran_order", path) != "False")
    throw InputError(path + " is Fortran-ordered: save a C-ordered array (numpy.ascontiguousarray)");
  auto shape = parse_shape(header_value(header, "shape", path), path);

  at::Tensor tensor = at::empty(shape, at::TensorOptions().dtype(dtype->type));
  const auto bytes = static_cast<std::streamsize>(tensor.nbytes());
  in.read(static_cast<char*>(tensor.data_ptr()), bytes);
  if (in.gcount() != bytes) throw InputError(path + " is truncated: it holds fewer values than its shape says");
  return tensor;
}

void write_npy(const std::string& path, const at::Tensor& tensor) {
  at::Tensor t = tensor.to(at::kCPU).contiguous();
  std::ostringstream dict;
  dict << "{'descr': '" << descr_of(t.scalar_type()) << "', 'fortran_order': False, 'shape': (";
  for (int64_t i = 0; i < t.dim(); ++i) dict << t.size(i) << (t.dim() == 1 || i + 1 < t.dim() ? ", " : "");
  dict << "), }";
  std::string header = dict.str();
  const size_t unpadded = 6 + 2 + 2 + header.size() + 1;  // magic, version, length, header, '\n'
  header.append((64 - unpadded % 64) % 64, ' ');
  header.push_back('\n');

  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) throw InputError("cannot write " + path + ": pass --out in a writable folder");
    const unsigned char version[2] = {1, 0};
    const unsigned char len[2] = {static_cast<unsigned char>(header.size() & 0xff),
                                  static_cast<unsigned char>(header.size() >> 8)};
    out.write(kMagic, 6);
    out.write(reinterpret_cast<const char*>(version), 2);
    out.write(reinterpret_cast<const char*>(len), 2);
    out.write(header.data(), static_cast<std::streamsize>(header.size()));
    out.write(static_cast<const char*>(t.data_ptr()), static_cast<std::streamsize>(t.nbytes()));
    if (!out) throw InputError("writing " + path + " failed (disk full?)");
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) throw InputError("cannot rename " + tmp + " to " + path);
}

}  // namespace stdrc
