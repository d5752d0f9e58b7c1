#include "stdrc/manifest.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <filesystem>
#include <fstream>

#include "stdrc/errors.h"

namespace stdrc {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

TensorSpec tensor_spec(const json& data) {
  TensorSpec spec;
  spec.name = data.at("name").get<std::string>();
  spec.dtype = data.at("dtype").get<std::string>();
  for (const auto& dim : data.at("shape")) {
    if (dim.is_string()) {
      spec.shape.push_back(-1);
      spec.symbols.push_back(dim.get<std::string>());
    } else {
      spec.shape.push_back(dim.get<int64_t>());
      spec.symbols.emplace_back();
    }
  }
  return spec;
}

ComponentEntry component_entry(const json& data) {
  ComponentEntry entry;
  entry.backend = data.at("backend").get<std::string>();
  entry.file = data.at("file").get<std::string>();
  entry.sha256 = data.at("sha256").get<std::string>();
  entry.precision = data.at("precision").get<std::string>();
  for (const auto& t : data.at("inputs")) entry.inputs.push_back(tensor_spec(t));
  for (const auto& t : data.at("outputs")) entry.outputs.push_back(tensor_spec(t));
  if (data.contains("dynamic_dims"))
    for (const auto& [name, range] : data.at("dynamic_dims").items()) entry.dynamic_dims[name] = range.get<std::vector<int64_t>>();
  if (data.contains("build"))
    for (const auto& [key, value] : data.at("build").items())
      if (value.is_string()) entry.build[key] = value.get<std::string>();
  return entry;
}

Manifest parse(const json& data) {
  Manifest m;
  m.format = data.at("format").get<int>();
  m.preset = data.at("preset").get<std::string>();
  const json& b = data.at("bucket");
  m.bucket.frames = b.at("frames").get<int64_t>();
  m.bucket.height = b.at("height").get<int64_t>();
  m.bucket.width = b.at("width").get<int64_t>();
  m.bucket.text_length = b.at("text_length").get<int64_t>();
  m.bucket.fps = b.at("fps").get<double>();
  const auto grid = b.at("latent_grid").get<std::vector<int64_t>>();
  if (grid.size() != 3) throw BundleError("bundle manifest bucket.latent_grid is not [T, H, W]: rebuild the bundle");
  m.bucket.latent_frames = grid[0];
  m.bucket.latent_height = grid[1];
  m.bucket.latent_width = grid[2];
  m.bucket.video_tokens = b.at("video_tokens").get<int64_t>();
  m.bucket.reference_tokens = b.at("reference_tokens").get<int64_t>();
  for (const auto& [name, entry] : data.at("components").items()) m.components[name] = component_entry(entry);
  const json& sampler = data.at("sampler");
  m.sigmas = sampler.at("sigmas").get<std::vector<float>>();
  m.distilled_sigmas = sampler.at("distilled_sigmas").get<std::vector<float>>();
  m.text_scale = data.at("guidance").at("text_scale").get<double>();
  m.ref_scale = data.at("guidance").at("ref_scale").get<double>();
  const json& config = data.at("model_config");
  m.latent_channels = config.at("dit").at("in_channels").get<int64_t>();
  const json& vae = config.at("vae");
  m.timestep_conditioning = vae.at("timestep_conditioning").get<bool>();
  m.decode_timestep = vae.at("decode_timestep").get<float>();
  m.decode_noise_scale = vae.at("decode_noise_scale").get<float>();
  if (data.contains("decode") && !data.at("decode").empty()) {
    const json& decode = data.at("decode");
    if (decode.value("placement", std::string()) != "ltx-core")
      throw BundleError("this bundle's decode tiles predate ltx-core's tile placement: rebuild it with "
                        "stdrc-export build-engines");
    m.decode_tiling.tile = decode.at("tile").get<int64_t>();
    m.decode_tiling.overlap = decode.at("overlap").get<int64_t>();
    m.decode_tiling.spatial_scale = decode.at("spatial_scale").get<int64_t>();
    if (m.decode_tiling.tile < 2 || m.decode_tiling.overlap < 0 || m.decode_tiling.overlap >= m.decode_tiling.tile ||
        m.decode_tiling.spatial_scale < 1)
      throw BundleError("bundle manifest decode tiling " + decode.dump() + " is invalid: rebuild the bundle");
  }
  return m;
}

}  // namespace

const ComponentEntry& Manifest::component(const std::string& name) const {
  auto it = components.find(name);
  if (it == components.end()) throw BundleError("bundle lacks the " + name + " component: rebuild it with build-engines");
  return it->second;
}

Manifest read_manifest(const std::string& bundle_dir) {
  const fs::path dir(bundle_dir);
  const fs::path path = dir / kManifestName;
  if (!fs::is_directory(dir))
    throw BundleError("bundle folder " + bundle_dir + " does not exist: build one with `stdrc-export build-engines`");
  if (!fs::is_regular_file(path))
    throw BundleError(path.string() + " is missing: " + bundle_dir + " is not a complete bundle; rebuild it");
  json data;
  try {
    std::ifstream in(path);
    data = json::parse(in);
  } catch (const json::exception& e) {
    throw BundleError(path.string() + " is not valid JSON (" + e.what() + "): the bundle is corrupt; rebuild it");
  }
  if (!data.is_object()) throw BundleError(path.string() + " is not a manifest object: rebuild the bundle");
  const json format = data.contains("format") ? data["format"] : json();
  if (!format.is_number_integer() || format.get<int>() != kFormatVersion)
    throw BundleError("bundle manifest format " + format.dump() + " is not supported (this stdrc reads format " +
                      std::to_string(kFormatVersion) + "): rebuild it with `stdrc-export build-engines`");
  try {
    return parse(data);
  } catch (const json::exception& e) {
    throw BundleError("bundle manifest is malformed (" + std::string(e.what()) + "): rebuild the bundle");
  }
}

void check_components(const std::string& bundle_dir, const Manifest& manifest, const std::vector<std::string>& names,
                      const std::vector<std::string>& backends) {
  for (const auto& name : names) {
    const ComponentEntry& entry = manifest.component(name);
    if (std::find(backends.begin(), backends.end(), entry.backend) == backends.end())
      throw BundleError("bundle component " + name + " is a " + entry.backend + " engine; this runner takes " +
                        backends.front() + " engines: rebuild the bundle with --backend " + backends.front());
    const fs::path file = fs::path(bundle_dir) / entry.file;
    if (!fs::is_regular_file(file)) throw BundleError("bundle file " + file.string() + " is missing: rebuild the bundle");
  }
}

}  // namespace stdrc
