// The engine bundle contract (DESIGN.md §4), read from manifest.json: the C++ twin of
// stdrc/runtime/manifest.py, limited to what a C++ app needs to sample and decode.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "stdrc/tiling.h"

namespace stdrc {

constexpr int kFormatVersion = 2;        // a "buckets" list
constexpr int kOldestFormatVersion = 1;  // one "bucket", still read
constexpr const char* kManifestName = "manifest.json";

// One engine input or output. A symbolic dim (e.g. "batch") is stored as -1 with its name.
struct TensorSpec {
  std::string name;
  std::vector<int64_t> shape;
  std::vector<std::string> symbols;  // "" for a static dim
  std::string dtype;                 // "float32", "int64", ...
};

struct ComponentEntry {
  std::string backend;
  std::string file;
  std::string sha256;
  std::string precision;
  std::vector<TensorSpec> inputs;
  std::vector<TensorSpec> outputs;
  std::map<std::string, std::vector<int64_t>> dynamic_dims;  // symbol -> {min, opt, max}
  std::map<std::string, std::string> build;                   // backend facts with string values
};

struct Bucket {
  int64_t frames = 0, height = 0, width = 0, text_length = 0;
  double fps = 0;
  int64_t latent_frames = 0, latent_height = 0, latent_width = 0;
  int64_t video_tokens = 0, reference_tokens = 0;
  std::string rope_file;  // its RoPE tables (format 2); Python writes them to the inputs folder

  std::string label() const;  // FRAMESxWIDTHxHEIGHT, as --bucket spells it
};

struct Manifest {
  int format = 0;
  std::string preset;
  Bucket bucket;                // the one the runner runs: the default (first) until select_bucket
  std::vector<Bucket> buckets;  // every bucket of the bundle, the default first
  std::map<std::string, ComponentEntry> components;
  std::vector<float> sigmas;            // sampler.sigmas (float32 like the Python runtime)
  std::vector<float> distilled_sigmas;  // sampler.distilled_sigmas
  double text_scale = 1.0, ref_scale = 1.0;
  int64_t latent_channels = 0;  // model_config.dit.in_channels (token width)
  // model_config.vae: decode-noise mixing before the decoder
  bool timestep_conditioning = false;
  float decode_timestep = 0.0f, decode_noise_scale = 0.0f;
  DecodeTiling decode_tiling;  // "decode": spatial tiles of the VAE decode; disabled = whole latent

  const ComponentEntry& component(const std::string& name) const;
  // Makes `bucket` the bundle's bucket spelled FRAMESxWIDTHxHEIGHT; InputError listing them if absent.
  void select_bucket(const std::string& label);
};

// Reads and validates `<bundle_dir>/manifest.json` (format version, required keys).
// Throws BundleError with the fix in the message.
Manifest read_manifest(const std::string& bundle_dir);

// `bundle_dir / rel`, refused (BundleError) unless it resolves inside the bundle folder (symlinks followed).
std::string bundle_file(const std::string& bundle_dir, const std::string& rel);

// Refuses a bundle whose `components` (as listed) are absent, of a backend not in `backends`, or
// whose files are missing. sha256 is not recomputed here: `stdrc verify` (Python) does that.
void check_components(const std::string& bundle_dir, const Manifest& manifest,
                      const std::vector<std::string>& names, const std::vector<std::string>& backends);

}  // namespace stdrc
