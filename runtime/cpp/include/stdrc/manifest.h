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
// A TensorRT plan built without its weights (REFIT + STRIP_PLAN; runtime/backends/tensorrt.py WEIGHTLESS_FLAG).
constexpr const char* kWeightlessFlag = "STRIP_PLAN";

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
  std::vector<std::string> builder_flags;                     // build.builder_flags (TensorRT)
  std::vector<std::string> extra_files;                       // the extra_files' names (verify checks their sha256)
};

// A weight-stripped TensorRT plan (builder_flags holds STRIP_PLAN): it has kernels but no weights, and runs
// right only once refit from its ONNX; the reader refuses the flag on any other backend.
bool needs_refit(const ComponentEntry& entry);

// The ONNX a weight-stripped plan is refit from: `<plan stem>.onnx` beside it, as the Python runtime finds it
// (runtime/backends/tensorrt.py refit_onnx). BundleError when the entry does not list it among its files.
std::string refit_onnx(const ComponentEntry& entry);

struct Bucket {
  int64_t frames = 0, height = 0, width = 0, text_length = 0;
  double fps = 0;
  int64_t latent_frames = 0, latent_height = 0, latent_width = 0;
  int64_t video_tokens = 0, reference_tokens = 0;
  std::string rope_file;  // its RoPE tables (format 2); Python writes them to the inputs folder
  std::string stage1_rope_file;  // "stage1": {"rope": ...}: the tables of its half grid (a two-stage bundle)

  std::string label() const;  // FRAMESxWIDTHxHEIGHT, as --bucket spells it
  // The stage-1 grid of a two-stage run: same frames/fps/text length, height/2 and width/2 (multiples of 64
  // make it a whole latent grid), its RoPE file the bucket's stage1 entry.
  Bucket half() const;
};

// The components only a two-stage bundle has (stdrc/runtime/vocab.py STAGE_COMPONENTS).
inline const std::vector<std::string>& stage_components() {
  static const std::vector<std::string> names = {"upsampler", "dit_refine"};
  return names;
}

// "two_stage" (stdrc/runtime/schema.py TwoStageConfig): guided sampling at half size, the upsampler,
// re-noise to sigmas[0], then the refinement DiT over `sigmas`, one stream.
struct TwoStage {
  bool enabled = false;       // false: a one-stage bundle (no "two_stage" section, or null)
  std::vector<float> sigmas;  // the stage-2 sigmas; sigmas[0] is the re-noise level
  int default_stages = 1;     // what --stages is when not given (2 for a two-stage bundle)
  std::string lora_name;      // the refinement LoRA's file name, for messages
  double lora_strength = 1.0;
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
  TwoStage two_stage;

  // 1 or 2 as `--stages` asks (0: the bundle's default); InputError naming the fix for 2 on a one-stage bundle.
  int resolve_stages(int stages) const;

  // Whether the vae_decoder engine lists a `timestep` input, the only case the decode feeds one (a
  // timestep-conditioned decoder; LTX-2.3's is not, and then no decode noise is read or mixed either).
  bool decoder_takes_timestep() const;

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
// whose files (a weight-stripped plan's refit ONNX included) are missing. sha256 is not recomputed here: `stdrc verify` (Python) does that.
void check_components(const std::string& bundle_dir, const Manifest& manifest,
                      const std::vector<std::string>& names, const std::vector<std::string>& backends);

}  // namespace stdrc
