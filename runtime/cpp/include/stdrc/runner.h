// A bundle loaded once (DiT + VAE decoder), then sample-and-decode from prepared inputs.
//
// The inputs folder is what `stdrc.runtime.cpp_inputs.write_cpp_inputs` writes (file names
// below), so Python and C++ run the same computation on identical inputs: text embeddings and
// the encoded reference come from Python; this side runs the sampling loop and the decoder.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "stdrc/engine.h"
#include "stdrc/manifest.h"
#include "stdrc/sampler.h"

namespace stdrc {

namespace files {
// inputs (written by Python)
constexpr const char* kNoise = "noise.npy";                   // [1, video_tokens, C] float32
constexpr const char* kReference = "reference_tokens.npy";    // [1, reference_tokens, C] float32
constexpr const char* kTextContext = "text_context.npy";      // [1, L, D] float32
constexpr const char* kTextMask = "text_mask.npy";            // [1, L] int64
constexpr const char* kNullContext = "null_context.npy";      // [1, L, D] float32 ("no text" prompt)
constexpr const char* kNullMask = "null_mask.npy";            // [1, L] int64
constexpr const char* kDecodeNoise = "decode_noise.npy";      // [1, C, F', H', W'] whole latent, float32
constexpr const char* kSigmas = "sigmas.npy";                 // [steps + 1] float32 (optional)
constexpr const char* kInputsJson = "inputs.json";            // {"guidance": {...}} (optional)
constexpr const char* kRopeCos = "rope_cos.npy";  // the bucket's RoPE tables, when the DiT takes them as inputs
constexpr const char* kRopeSin = "rope_sin.npy";
// outputs
constexpr const char* kLatent = "latent.npy";  // final video tokens [1, video_tokens, C] float32
constexpr const char* kVideo = "video.npy";    // decoder output [1, 3, F, H, W] float32 in [-1, 1]
constexpr const char* kFrames = "frames.npy";  // [F, H, W, 3] uint8
}  // namespace files

struct RunInputs {
  at::Tensor noise;
  Conditioning cond;
  at::Tensor decode_noise;  // undefined when the decoder is not timestep-conditioned
  std::vector<float> sigmas;
  GuidanceScales scales;
  at::Tensor rope_cos, rope_sin;  // undefined when the DiT has its tables baked in
};

struct RunOutputs {
  at::Tensor latent, video, frames;
};

class Runner {
 public:
  // Validates the manifest (format, components, backends, files) and loads dit + vae_decoder.
  // `trust_code`: aoti engines load a shared library from the bundle (code runs); refused unless true.
  static std::unique_ptr<Runner> from_bundle(const std::string& bundle_dir, c10::Device device = c10::kCPU,
                                             bool trust_code = false);

  const Manifest& manifest() const { return manifest_; }

  // Runs the bundle's bucket FRAMESxWIDTHxHEIGHT (default: the first); InputError listing them if absent.
  void select_bucket(const std::string& label) { manifest_.select_bucket(label); }
  bool rope_inputs() const;  // the DiT takes rope_cos/rope_sin (a bundle of several buckets)
  bool sigma_input() const;  // the DiT takes the stream's sigma last (a prompt-AdaLN DiT, LTX-2.3)

  // Reads an inputs folder; sigmas and guidance default to the manifest's where the folder has none.
  RunInputs read_inputs(const std::string& folder) const;

  // Throws InputError naming the file, its shape and the shape the bundle needs.
  void check_inputs(const RunInputs& inputs) const;

  at::Tensor sample(const RunInputs& inputs, int max_batch = 3, const std::function<void(int)>& on_step = nullptr);

  // Tokens [1, video_tokens, C] -> decoder video [1, 3, F, H, W] (decode noise mixed in first).
  at::Tensor decode(const at::Tensor& tokens, const at::Tensor& decode_noise);

  RunOutputs run(const RunInputs& inputs, int max_batch = 3, const std::function<void(int)>& on_step = nullptr);

 private:
  Runner(std::string bundle_dir, Manifest manifest, c10::Device device);

  std::string bundle_dir_;
  Manifest manifest_;
  c10::Device device_;
  std::unique_ptr<Engine> dit_, decoder_;
};

// Decoder output [1, 3, F, H, W] in [-1, 1] -> [F, H, W, 3] uint8 (as runtime/video.py).
at::Tensor frames_to_uint8(const at::Tensor& video);

// A 1-D float .npy of at least two decreasing-to-final sigmas (steps + 1 values).
std::vector<float> read_sigmas(const std::string& path);

void write_outputs(const RunOutputs& outputs, const std::string& folder);

}  // namespace stdrc
