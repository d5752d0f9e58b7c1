#include "stdrc/manifest.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>

#include "stdrc/errors.h"

namespace stdrc {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

// The typed reader of stdrc/runtime/schema.py: a wrong type, range or path is one BundleError line.
const char* const kFix = ": rebuild the bundle with `stdrc-export build-engines`";

const json& field(const json& data, const std::string& key, const std::string& where) {
  if (!data.is_object()) throw BundleError("bundle manifest " + where + " is not an object" + kFix);
  if (!data.contains(key)) throw BundleError("bundle manifest lacks " + where + "." + key + kFix);
  return data.at(key);
}

[[noreturn]] void bad(const std::string& where, const json& value, const std::string& expected) {
  std::string shown = value.dump();
  if (shown.size() > 60) shown = shown.substr(0, 57) + "...";
  throw BundleError("bundle manifest " + where + " is " + shown + ", expected " + expected + kFix);
}

int64_t integer(const json& data, const std::string& key, const std::string& where, int64_t lo) {
  const json& v = field(data, key, where);
  if (!v.is_number_integer() || v.get<int64_t>() < lo) bad(where + "." + key, v, "an integer >= " + std::to_string(lo));
  return v.get<int64_t>();
}

double number(const json& data, const std::string& key, const std::string& where, double lo, double hi) {
  const json& v = field(data, key, where);
  if (!v.is_number() || !std::isfinite(v.get<double>()) || v.get<double>() < lo || v.get<double>() > hi)
    bad(where + "." + key, v, "a finite number in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
  return v.get<double>();
}

std::string text(const json& data, const std::string& key, const std::string& where) {
  const json& v = field(data, key, where);
  if (!v.is_string() || v.get<std::string>().empty()) bad(where + "." + key, v, "a non-empty string");
  return v.get<std::string>();
}

const json& object(const json& data, const std::string& key, const std::string& where) {
  const json& v = field(data, key, where);
  if (!v.is_object()) bad(where + "." + key, v, "an object");
  return v;
}

// A file name relative to the bundle folder: no absolute path, no "..", no NUL or backslash.
std::string relative_file(const json& data, const std::string& key, const std::string& where) {
  const json& v = field(data, key, where);
  if (!v.is_string() || v.get<std::string>().empty()) bad(where + "." + key, v, "a file name relative to the bundle");
  const std::string rel = v.get<std::string>();
  const fs::path path(rel);
  const bool dots = std::any_of(path.begin(), path.end(), [](const fs::path& part) { return part == ".."; });
  if (rel.find('\0') != std::string::npos || rel.find('\\') != std::string::npos || path.is_absolute() ||
      rel.front() == '/' || dots || (rel.size() > 1 && rel[1] == ':'))
    throw BundleError("bundle manifest " + where + "." + key + " is " + v.dump() +
                      ", which leaves the bundle folder (absolute or with ..): refusing it" + kFix);
  return rel;
}

double number(const json& list, size_t i, const std::string& where) {
  const json& v = list.at(i);
  if (!v.is_number() || !std::isfinite(v.get<double>()) || v.get<double>() < 0 || v.get<double>() > 1)
    bad(where, list, "sigmas in [0, 1]");
  return v.get<double>();
}

std::vector<float> sigmas(const json& data, const std::string& key, const std::string& where = "sampler") {
  const json& v = field(data, key, where);
  if (!v.is_array() || v.size() < 2) bad(where + "." + key, v, "at least 2 non-increasing sigmas in [0, 1]");
  std::vector<float> out;
  for (size_t i = 0; i < v.size(); ++i) {
    out.push_back(static_cast<float>(number(v, i, where + "." + key)));
    if (i > 0 && out[i] > out[i - 1]) bad(where + "." + key, v, "non-increasing sigmas");
  }
  return out;
}

TensorSpec tensor_spec(const json& data) {
  TensorSpec spec;
  spec.name = text(data, "name", "tensor");
  spec.dtype = text(data, "dtype", "tensor");
  if (!field(data, "shape", "tensor").is_array()) bad("tensor.shape", data.at("shape"), "a list of sizes");
  for (const auto& dim : data.at("shape")) {
    if (dim.is_string()) {
      spec.shape.push_back(-1);
      spec.symbols.push_back(dim.get<std::string>());
    } else {
      if (!dim.is_number_integer() || dim.get<int64_t>() < 0) bad("tensor.shape", data.at("shape"), "sizes >= 0 or names");
      spec.shape.push_back(dim.get<int64_t>());
      spec.symbols.emplace_back();
    }
  }
  return spec;
}

ComponentEntry component_entry(const json& data, const std::string& where) {
  ComponentEntry entry;
  entry.backend = text(data, "backend", where);
  entry.file = relative_file(data, "file", where);
  entry.sha256 = text(data, "sha256", where);
  entry.precision = text(data, "precision", where);
  for (const char* key : {"inputs", "outputs"})
    if (!field(data, key, where).is_array() || data.at(key).empty()) bad(where + "." + key, data.at(key), "a list of tensors");
  for (const auto& t : data.at("inputs")) entry.inputs.push_back(tensor_spec(t));
  for (const auto& t : data.at("outputs")) entry.outputs.push_back(tensor_spec(t));
  if (data.contains("dynamic_dims"))
    for (const auto& [name, range] : data.at("dynamic_dims").items()) entry.dynamic_dims[name] = range.get<std::vector<int64_t>>();
  if (data.contains("build"))
    for (const auto& [key, value] : data.at("build").items())
      if (value.is_string()) entry.build[key] = value.get<std::string>();
  if (data.contains("extra_files"))
    for (const auto& item : object(data, "extra_files", where).items()) entry.extra_files.push_back(item.key());
  if (data.contains("build") && data.at("build").is_object() && data.at("build").contains("builder_flags")) {
    const json& flags = data.at("build").at("builder_flags");
    if (!flags.is_null() && (!flags.is_array() || !std::all_of(flags.begin(), flags.end(), [](const json& f) {
          return f.is_string(); })))
      bad(where + ".build.builder_flags", flags, "a list of flag names");
    if (flags.is_array()) entry.builder_flags = flags.get<std::vector<std::string>>();
  }
  if (needs_refit(entry) && entry.backend != "tensorrt")
    throw BundleError("bundle manifest " + where + " is marked " + kWeightlessFlag + " (weight-stripped) but its "
                      "backend is " + entry.backend + ": only a TensorRT plan is refit at load" + kFix);
  if (needs_refit(entry)) refit_onnx(entry);  // refused now, before any file is read
  const bool shares = entry.build.count("constants_from") || entry.build.count("constants_file");
  for (const char* key : {"constants_from", "constants_file"})  // an aoti package given its constants at load
    if (shares && (entry.backend != "aoti" || !entry.build.count(key) ||
                   std::find(entry.extra_files.begin(), entry.extra_files.end(), entry.build.at(key)) ==
                       entry.extra_files.end()))
      throw BundleError("bundle manifest " + where + ".build." + key + " must name one of its extra_files, with "
                        "constants_from and constants_file both given, on an aoti engine" + kFix);
  return entry;
}

Bucket parse_bucket(const json& b, const std::string& where) {
  Bucket bucket;
  bucket.frames = integer(b, "frames", where, 1);
  bucket.height = integer(b, "height", where, 32);
  bucket.width = integer(b, "width", where, 32);
  bucket.text_length = integer(b, "text_length", where, 1);
  bucket.fps = number(b, "fps", where, 1e-6, 1000);
  if ((bucket.frames - 1) % 8 || bucket.height % 32 || bucket.width % 32)
    bad(where, b, "frames 8k+1 and sizes multiples of 32");
  const std::vector<int64_t> want = {(bucket.frames - 1) / 8 + 1, bucket.height / 32, bucket.width / 32};
  const json& grid = field(b, "latent_grid", where);
  if (!grid.is_array() || grid.size() != 3 || !std::all_of(grid.begin(), grid.end(), [](const json& v) {
        return v.is_number_integer(); }) || grid.get<std::vector<int64_t>>() != want)
    bad(where + ".latent_grid", grid, "[T, H, W] of this bucket");
  bucket.latent_frames = want[0];
  bucket.latent_height = want[1];
  bucket.latent_width = want[2];
  bucket.video_tokens = integer(b, "video_tokens", where, 1);
  bucket.reference_tokens = integer(b, "reference_tokens", where, 1);
  if (bucket.video_tokens != want[0] * want[1] * want[2] || bucket.reference_tokens != want[1] * want[2])
    bad(where, b, "token counts of this bucket");
  if (b.contains("rope")) bucket.rope_file = relative_file(object(b, "rope", where), "file", where + ".rope");
  if (b.contains("stage1"))
    bucket.stage1_rope_file = relative_file(object(object(b, "stage1", where), "rope", where + ".stage1"), "file",
                                            where + ".stage1.rope");
  return bucket;
}

// "two_stage" (schema.py TwoStageConfig) with manifest.py's _check_two_stage: both stage components, a DiT fed
// its RoPE tables, per bucket a multiple-of-64 size with its stage-1 tables. Null or absent: a one-stage bundle,
// which holds neither stage component.
TwoStage parse_two_stage(const json& data, const Manifest& m) {
  TwoStage two;
  std::string present;
  for (const std::string& name : stage_components())
    if (m.components.count(name)) present += (present.empty() ? "" : ", ") + name;
  if (!data.contains("two_stage") || data.at("two_stage").is_null()) {
    if (!present.empty()) throw BundleError("bundle manifest holds " + present + " but no two_stage section" + kFix);
    return two;
  }
  const json& section = object(data, "two_stage", "manifest");
  two.enabled = true;
  two.sigmas = sigmas(section, "sigmas", "two_stage");
  if (two.sigmas.back() != 0.0f || two.sigmas.front() >= 1.0f)
    bad("two_stage.sigmas", section.at("sigmas"), "sigmas from a re-noise level below 1 down to 0");
  two.default_stages = 2;
  if (section.contains("default_stages")) {
    two.default_stages = static_cast<int>(integer(section, "default_stages", "two_stage", 1));
    if (two.default_stages > 2) bad("two_stage.default_stages", section.at("default_stages"), "1 or 2");
  }
  if (section.contains("lora") && !section.at("lora").is_null()) {
    const json& lora = object(section, "lora", "two_stage");
    two.lora_name = text(lora, "name", "two_stage.lora");
    two.lora_strength = number(lora, "strength", "two_stage.lora", -100, 100);
  }
  for (const std::string& name : stage_components())
    if (!m.components.count(name))
      throw BundleError("bundle manifest has a two_stage section but no " + name + " component" + kFix +
                        " --upsampler FILE --refine-lora FILE");
  const auto& dit = m.component("dit").inputs;
  if (std::none_of(dit.begin(), dit.end(), [](const TensorSpec& t) { return t.name == "rope_cos"; }))
    throw BundleError("bundle manifest's two-stage DiT has its RoPE tables baked in; it runs two token grids and "
                      "takes them as inputs" + std::string(kFix));
  for (size_t i = 0; i < m.buckets.size(); ++i) {
    const Bucket& b = m.buckets[i];
    const std::string where = "buckets[" + std::to_string(i) + "]";
    if (b.height % 64 || b.width % 64)
      throw BundleError("bundle manifest " + where + " is " + b.label() + " (FRAMESxWIDTHxHEIGHT): a two-stage "
                        "bucket's width and height are multiples of 64" + kFix);
    if (b.stage1_rope_file.empty())
      throw BundleError("bundle manifest " + where + " lacks stage1.rope (the half grid's RoPE tables)" + kFix);
  }
  return two;
}

Manifest parse(const json& data) {
  Manifest m;
  m.format = data.at("format").get<int>();
  m.preset = text(data, "preset", "manifest");
  if (m.format == kOldestFormatVersion) {
    m.buckets.push_back(parse_bucket(object(data, "bucket", "manifest"), "bucket"));
  } else {
    const json& list = field(data, "buckets", "manifest");
    if (!list.is_array() || list.empty()) bad("buckets", list, "a non-empty list of buckets");
    for (size_t i = 0; i < list.size(); ++i)
      m.buckets.push_back(parse_bucket(list[i], "buckets[" + std::to_string(i) + "]"));
  }
  m.bucket = m.buckets.front();
  for (const auto& [name, entry] : object(data, "components", "manifest").items())
    m.components[name] = component_entry(entry, "components." + name);
  const json& sampler = object(data, "sampler", "manifest");
  m.sigmas = sigmas(sampler, "sigmas");
  m.distilled_sigmas = sigmas(sampler, "distilled_sigmas");
  const json& guidance = object(data, "guidance", "manifest");
  m.text_scale = number(guidance, "text_scale", "guidance", -100, 100);
  m.ref_scale = number(guidance, "ref_scale", "guidance", -100, 100);
  const json& config = object(data, "model_config", "manifest");
  m.latent_channels = integer(object(config, "dit", "model_config"), "in_channels", "model_config.dit", 1);
  const json& vae = object(config, "vae", "model_config");
  if (!field(vae, "timestep_conditioning", "model_config.vae").is_boolean())
    bad("model_config.vae.timestep_conditioning", vae.at("timestep_conditioning"), "true or false");
  m.timestep_conditioning = vae.at("timestep_conditioning").get<bool>();
  m.decode_timestep = static_cast<float>(number(vae, "decode_timestep", "model_config.vae", 0, 1));
  m.decode_noise_scale = static_cast<float>(number(vae, "decode_noise_scale", "model_config.vae", 0, 1));
  if (data.contains("decode") && !object(data, "decode", "manifest").empty()) {
    const json& decode = data.at("decode");
    if (decode.value("placement", std::string()) != "ltx-core")
      throw BundleError("this bundle's decode tiles predate ltx-core's tile placement: rebuild it with "
                        "stdrc-export build-engines");
    m.decode_tiling.tile = integer(decode, "tile", "decode", 2);
    m.decode_tiling.overlap = integer(decode, "overlap", "decode", 0);
    m.decode_tiling.spatial_scale = integer(decode, "spatial_scale", "decode", 1);
    if (m.decode_tiling.tile < 2 || m.decode_tiling.overlap < 0 || m.decode_tiling.overlap >= m.decode_tiling.tile ||
        m.decode_tiling.spatial_scale < 1)
      throw BundleError("bundle manifest decode tiling " + decode.dump() + " is invalid: rebuild the bundle");
  }
  m.two_stage = parse_two_stage(data, m);
  return m;
}

}  // namespace

bool needs_refit(const ComponentEntry& entry) {
  return std::find(entry.builder_flags.begin(), entry.builder_flags.end(), kWeightlessFlag) != entry.builder_flags.end();
}

std::string refit_onnx(const ComponentEntry& entry) {
  const std::string onnx = fs::path(entry.file).replace_extension(".onnx").generic_string();
  if (std::find(entry.extra_files.begin(), entry.extra_files.end(), onnx) == entry.extra_files.end())
    throw BundleError(entry.file + " is built without its weights (" + kWeightlessFlag + ") and its entry lists no " +
                      onnx + " to refit it from: rebuild the bundle");
  return onnx;
}

const ComponentEntry& Manifest::component(const std::string& name) const {
  auto it = components.find(name);
  if (it == components.end()) throw BundleError("bundle lacks the " + name + " component: rebuild it with build-engines");
  return it->second;
}

Bucket Bucket::half() const {
  Bucket h = *this;
  h.height = height / 2;
  h.width = width / 2;
  h.latent_height = h.height / 32;
  h.latent_width = h.width / 32;
  h.video_tokens = h.latent_frames * h.latent_height * h.latent_width;
  h.reference_tokens = h.latent_height * h.latent_width;
  h.rope_file = stage1_rope_file;
  h.stage1_rope_file.clear();
  return h;
}

bool Manifest::decoder_takes_timestep() const {
  const auto& inputs = component("vae_decoder").inputs;
  return std::any_of(inputs.begin(), inputs.end(), [](const TensorSpec& t) { return t.name == "timestep"; });
}

int Manifest::resolve_stages(int stages) const {
  if (stages == 0) return two_stage.enabled ? two_stage.default_stages : 1;
  if (stages != 1 && stages != 2) throw InputError("--stages " + std::to_string(stages) + ": use 1 or 2");
  if (stages == 2 && !two_stage.enabled)
    throw InputError("--stages 2: this bundle is one-stage (no upsampler, no dit_refine): pass --stages 1, or "
                     "rebuild it with --upsampler FILE --refine-lora FILE");
  return stages;
}

std::string Bucket::label() const {
  return std::to_string(frames) + "x" + std::to_string(width) + "x" + std::to_string(height);
}

void Manifest::select_bucket(const std::string& label) {
  std::string have;
  for (const Bucket& b : buckets) {
    if (b.label() == label) {
      bucket = b;
      return;
    }
    have += (have.empty() ? "" : ", ") + b.label();
  }
  throw InputError("--bucket " + label + ": this bundle has no bucket of that size; its buckets (FRAMESxWIDTHxHEIGHT) "
                   "are " + have + ": pass one of them");
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
  if (!format.is_number_integer() || format.get<int>() < kOldestFormatVersion || format.get<int>() > kFormatVersion)
    throw BundleError("bundle manifest format " + format.dump() + " is not supported (this stdrc reads formats " +
                      std::to_string(kOldestFormatVersion) + " to " + std::to_string(kFormatVersion) +
                      "): rebuild it with `stdrc-export build-engines`");
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
    std::vector<std::string> files = {entry.file};
    if (needs_refit(entry)) files.push_back(refit_onnx(entry));
    for (const char* key : {"constants_from", "constants_file"})
      if (entry.build.count(key)) files.push_back(entry.build.at(key));
    for (const std::string& rel : files) {
      const fs::path file = bundle_file(bundle_dir, rel);
      if (!fs::is_regular_file(file)) throw BundleError("bundle file " + file.string() + " is missing: rebuild the bundle");
    }
  }
}

std::string bundle_file(const std::string& bundle_dir, const std::string& rel) {
  const fs::path root = fs::weakly_canonical(fs::path(bundle_dir));
  const fs::path path = root / rel;
  const fs::path real = fs::weakly_canonical(path);
  const auto mismatch = std::mismatch(root.begin(), root.end(), real.begin(), real.end());
  if (mismatch.first != root.end())
    throw BundleError("bundle file " + rel + " is a link to " + real.string() + ", outside the bundle folder " +
                      root.string() + ": refusing it; rebuild the bundle");
  return path.string();
}

}  // namespace stdrc
