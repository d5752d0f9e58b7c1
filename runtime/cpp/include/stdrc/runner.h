// A bundle loaded once (DiT + VAE decoder; a two-stage bundle's upsampler and refinement DiT when first
// used), then sample-and-decode from prepared inputs.
//
// The inputs folder is what `stdrc.runtime.cpp_inputs.write_cpp_inputs` writes (file names
// below), so Python and C++ run the same computation on identical inputs: text embeddings and
// the encoded reference come from Python; this side runs the sampling loop(s), the upsampler and the decoder.
//
// Two stages (TWOSTAGE.md, the Python runtime's algorithm): guided sampling at the bucket's half grid
// (noise, reference and RoPE tables of that grid), the `upsampler`, re-noise with the stage-2 noise to
// two_stage.sigmas[0], Euler over two_stage.sigmas with `dit_refine` (one stream: text + output-size
// reference), decode at the bucket.
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
// a two-stage run: the files above are stage 1's (the half grid); stage 2's at the bucket:
constexpr const char* kStage2Noise = "stage2_noise.npy";                // [1, video_tokens, C] (seed + 2)
constexpr const char* kStage2Reference = "stage2_reference_tokens.npy";  // [1, reference_tokens, C]
constexpr const char* kStage2RopeCos = "stage2_rope_cos.npy";           // when dit_refine takes the tables
constexpr const char* kStage2RopeSin = "stage2_rope_sin.npy";
// outputs
constexpr const char* kLatent = "latent.npy";  // final video tokens [1, video_tokens, C] float32
constexpr const char* kVideo = "video.npy";    // decoder output [1, 3, F, H, W] float32 in [-1, 1]
constexpr const char* kFrames = "frames.npy";  // [F, H, W, 3] uint8
constexpr const char* kStage1Latent = "stage1_latent.npy";  // a two-stage run: stage 1's tokens at the half grid
}  // namespace files

// Stage 2 of a two-stage run, at the output bucket.
struct RefineInputs {
  at::Tensor noise;               // re-noise drawn from seed + 2
  at::Tensor reference;           // the reference encoded at the output size
  at::Tensor rope_cos, rope_sin;  // undefined when dit_refine has its tables baked in
};

struct RunInputs {
  int stages = 1;  // 2: noise, cond.reference and the RoPE tables are at the half grid, `refine` at the bucket
  at::Tensor noise;
  Conditioning cond;
  at::Tensor decode_noise;  // undefined when the decoder is not timestep-conditioned
  std::vector<float> sigmas;
  GuidanceScales scales;
  at::Tensor rope_cos, rope_sin;  // undefined when the DiT has its tables baked in
  RefineInputs refine;            // stages == 2 only
};

struct RunOutputs {
  at::Tensor latent, video, frames;
  at::Tensor stage1_latent;  // a two-stage run: stage 1's tokens (half grid); else undefined
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
  // The DiT (`dit`, or `dit_refine`) takes rope_cos/rope_sin (a bundle of several buckets or grids).
  bool rope_inputs(const std::string& dit = "dit") const;
  // The DiT takes the stream's sigma last (a prompt-AdaLN DiT, LTX-2.3).
  bool sigma_input(const std::string& dit = "dit") const;

  // The grid stage 1 samples at: the bucket, or its half for a two-stage run.
  Bucket sampling_grid(int stages) const { return stages == 2 ? manifest_.bucket.half() : manifest_.bucket; }

  // Reads an inputs folder; sigmas and guidance default to the manifest's where the folder has none.
  // `stages` (0: what inputs.json says it was written for, else the bundle's default): 2 also reads stage 2's
  // files; an inputs folder written for the other stage count is an InputError naming the fix.
  RunInputs read_inputs(const std::string& folder, int stages = 0) const;

  // Throws InputError naming the file, its shape and the shape the bundle needs.
  void check_inputs(const RunInputs& inputs) const;

  // Stage 1 (the only stage of a one-stage run): guided Euler from the noise at sampling_grid(stages).
  at::Tensor sample(const RunInputs& inputs, int max_batch = 3, const std::function<void(int)>& on_step = nullptr);

  // Half-grid tokens [1, N/4, C] -> the upsampler -> output-grid tokens [1, video_tokens, C].
  at::Tensor upsample(const at::Tensor& tokens);

  // Stage 2: re-noise `upsampled` to two_stage.sigmas[0] with inputs.refine.noise, then `dit_refine` over
  // two_stage.sigmas, one stream (text + output-size reference). `on_step(i)` counts from 0.
  at::Tensor refine(const at::Tensor& upsampled, const RunInputs& inputs,
                    const std::function<void(int)>& on_step = nullptr);

  // Steps of a run: stage 1's sigmas, plus the refinement's on two stages.
  int total_steps(const RunInputs& inputs) const;

  // Tokens [1, video_tokens, C] -> decoder video [1, 3, F, H, W] (decode noise mixed in first).
  at::Tensor decode(const at::Tensor& tokens, const at::Tensor& decode_noise);

  // sample (+ upsample + refine on two stages) + decode; `on_step(i)` with i over total_steps.
  RunOutputs run(const RunInputs& inputs, int max_batch = 3, const std::function<void(int)>& on_step = nullptr);

 private:
  Runner(std::string bundle_dir, Manifest manifest, c10::Device device);
  Engine& engine(const std::string& name);  // opened on first use (a two-stage bundle's stage engines)

  std::string bundle_dir_;
  Manifest manifest_;
  c10::Device device_;
  std::map<std::string, std::unique_ptr<Engine>> engines_;
};

// Decoder output [1, 3, F, H, W] in [-1, 1] -> [F, H, W, 3] uint8 (as runtime/video.py).
at::Tensor frames_to_uint8(const at::Tensor& video);

// A 1-D float .npy of at least two decreasing-to-final sigmas (steps + 1 values).
std::vector<float> read_sigmas(const std::string& path);

void write_outputs(const RunOutputs& outputs, const std::string& folder);

}  // namespace stdrc
