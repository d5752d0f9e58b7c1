// LTX-2 rectified-flow Euler sampling with decoupled text/reference guidance: the C++ twin of
// stdrc/runtime/sampler.py (same math, same float32 step arithmetic). The DiT is injected.
#pragma once

#include <ATen/core/Tensor.h>

#include <functional>
#include <map>
#include <optional>
#include <utility>
#include <vector>

namespace stdrc {

// The three guidance streams: (uses text, uses reference).
enum class Stream { Uncond, Ref, Full };

struct GuidanceScales {
  double text = 3.0;  // s_txt
  double ref = 2.0;   // s_ref
  std::optional<std::pair<double, double>> interval;  // guide only while lo <= sigma <= hi
  double rescale = 0.0;                               // CFG rescale phi in [0, 1]

  // Only the streams the scales need (s_ref = s_txt = 1: one; s_ref = 1: two).
  std::vector<Stream> streams(double sigma) const;
};

// What the streams are built from. Tensors are batch-1: reference [1, R, C], context [1, L, D],
// masks [1, L] int64.
struct Conditioning {
  at::Tensor reference;
  at::Tensor text_context, text_mask;
  at::Tensor null_context, null_mask;
};

// velocity [B, N, C] = dit(latent [B, N, C], timestep [B, N], context [B, L, D],
//                          context_mask [B, L], attn_mask [B, N], sigma [B])
// sigma is the stream's sigma (float32): a DiT with the prompt AdaLN (LTX-2.3) takes it, others ignore it.
using Denoiser = std::function<at::Tensor(const at::Tensor& latent, const at::Tensor& timestep,
                                          const at::Tensor& context, const at::Tensor& context_mask,
                                          const at::Tensor& attn_mask, const at::Tensor& sigma)>;

// d = d_u + s_ref (d_r - d_u) + s_txt (d_f - d_r), using only the streams present.
at::Tensor combine(const std::map<Stream, at::Tensor>& denoised, const GuidanceScales& scales);

// context, context_mask and attn_mask of one batch of streams: the same at every step, so they are
// built (and placed on the device) once per stream set and reused; only latent and timestep move.
struct FixedInputs {
  at::Tensor context, context_mask, attn_mask;
};
using FixedCache = std::map<std::vector<Stream>, FixedInputs>;

// Denoised video tokens d = x - sigma * v per stream; streams batched, split by `max_batch`.
// With `fixed` (one per generation), the fixed inputs of each batch are built once and reused.
std::map<Stream, at::Tensor> denoise_streams(const Denoiser& dit, const std::vector<Stream>& names, const at::Tensor& x,
                                             float sigma, const Conditioning& cond, int max_batch,
                                             FixedCache* fixed = nullptr);

// Euler on velocity over `sigmas` from the latent `start` (already at sigmas[0]):
// x <- x + (sigma_next - sigma) * v, v from the guided d. `on_step(i)` after step i.
at::Tensor sample_from(const Denoiser& dit, const at::Tensor& start, const std::vector<float>& sigmas,
                       const Conditioning& cond, const GuidanceScales& scales, int max_batch = 3,
                       const std::function<void(int)>& on_step = nullptr);

// sample_from(noise * sigmas[0]): generation from pure noise.
at::Tensor sample(const Denoiser& dit, const at::Tensor& noise, const std::vector<float>& sigmas,
                  const Conditioning& cond, const GuidanceScales& scales, int max_batch = 3,
                  const std::function<void(int)>& on_step = nullptr);

}  // namespace stdrc
