#include "stdrc/sampler.h"

#include <ATen/TensorOperators.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/full.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/std.h>

#include <algorithm>
#include <cstddef>

namespace stdrc {
namespace {

bool uses_text(Stream s) { return s == Stream::Full; }
bool uses_reference(Stream s) { return s != Stream::Uncond; }

}  // namespace

std::vector<Stream> GuidanceScales::streams(double sigma) const {
  if (interval && !(interval->first <= sigma && sigma <= interval->second)) return {Stream::Full};
  if (ref == 1.0 && text == 1.0) return {Stream::Full};
  if (ref == 1.0) return {Stream::Ref, Stream::Full};
  return {Stream::Uncond, Stream::Ref, Stream::Full};
}

at::Tensor combine(const std::map<Stream, at::Tensor>& denoised, const GuidanceScales& scales) {
  const at::Tensor& full = denoised.at(Stream::Full);
  if (denoised.size() == 1) return full;
  const at::Tensor& ref = denoised.at(Stream::Ref);
  auto it = denoised.find(Stream::Uncond);
  const at::Tensor& uncond = it != denoised.end() ? it->second : ref;  // absent only when s_ref = 1
  // Scales enter as float32 like numpy's weak Python scalars do.
  at::Tensor out = uncond + (ref - uncond) * static_cast<float>(scales.ref) + (full - ref) * static_cast<float>(scales.text);
  if (scales.rescale > 0) {
    const float full_std = full.std(/*unbiased=*/false).item<float>();
    const double out_std = std::max(static_cast<double>(out.std(/*unbiased=*/false).item<float>()), 1e-12);
    const float factor = full_std / static_cast<float>(out_std);  // float32 / weak scalar, as numpy
    out = (out * factor) * static_cast<float>(scales.rescale) + out * static_cast<float>(1.0 - scales.rescale);
  }
  return out;
}

namespace {

FixedInputs build_fixed(const std::vector<Stream>& chunk, int64_t video, int64_t ref, const Conditioning& cond,
                        const at::TensorOptions& opts) {
  std::vector<at::Tensor> contexts, masks, attns;
  for (const Stream s : chunk) {
    at::Tensor attn = at::ones({1, video + ref}, opts.dtype(at::kLong));
    if (!uses_reference(s)) attn.narrow(1, video, ref).zero_();
    contexts.push_back(uses_text(s) ? cond.text_context : cond.null_context);
    masks.push_back(uses_text(s) ? cond.text_mask : cond.null_mask);
    attns.push_back(attn);
  }
  return {at::cat(contexts, 0), at::cat(masks, 0), at::cat(attns, 0)};
}

}  // namespace

std::map<Stream, at::Tensor> denoise_streams(const Denoiser& dit, const std::vector<Stream>& names, const at::Tensor& x,
                                             float sigma, const Conditioning& cond, int max_batch,
                                             FixedCache* fixed) {
  const int64_t video = x.size(1), ref = cond.reference.size(1);
  const auto opts = x.options();
  const at::Tensor latent = at::cat({x, cond.reference}, 1);
  const at::Tensor timestep = at::cat({at::full({1, video}, sigma, opts), at::full({1, ref}, 0.0f, opts)}, 1);
  std::map<Stream, at::Tensor> out;
  for (size_t start = 0; start < names.size(); start += static_cast<size_t>(max_batch)) {
    const size_t stop = std::min(names.size(), start + static_cast<size_t>(max_batch));
    const std::vector<Stream> chunk(names.begin() + static_cast<std::ptrdiff_t>(start),
                                    names.begin() + static_cast<std::ptrdiff_t>(stop));
    FixedInputs local;
    const FixedInputs* in = nullptr;
    if (fixed != nullptr) {
      auto it = fixed->find(chunk);
      if (it == fixed->end()) it = fixed->emplace(chunk, build_fixed(chunk, video, ref, cond, opts)).first;
      in = &it->second;
    } else {
      local = build_fixed(chunk, video, ref, cond, opts);
      in = &local;
    }
    const int64_t batch = static_cast<int64_t>(chunk.size());
    const at::Tensor velocity = dit(latent.expand({batch, -1, -1}).contiguous(),
                                    timestep.expand({batch, -1}).contiguous(), in->context, in->context_mask,
                                    in->attn_mask, at::full({batch}, sigma, opts));
    for (size_t i = start; i < stop; ++i) {
      const at::Tensor v = velocity.narrow(0, static_cast<int64_t>(i - start), 1).narrow(1, 0, video).to(at::kFloat);
      out[names[i]] = x - v * sigma;
    }
  }
  return out;
}

at::Tensor sample(const Denoiser& dit, const at::Tensor& noise, const std::vector<float>& sigmas,
                  const Conditioning& cond, const GuidanceScales& scales, int max_batch,
                  const std::function<void(int)>& on_step) {
  return sample_from(dit, noise.to(at::kFloat) * sigmas.front(), sigmas, cond, scales, max_batch, on_step);
}

at::Tensor sample_from(const Denoiser& dit, const at::Tensor& start, const std::vector<float>& sigmas,
                       const Conditioning& cond, const GuidanceScales& scales, int max_batch,
                       const std::function<void(int)>& on_step) {
  at::Tensor x = start.to(at::kFloat);
  FixedCache fixed;  // per stream set, reused by every step
  for (size_t i = 0; i + 1 < sigmas.size(); ++i) {
    const float sigma = sigmas[i], sigma_next = sigmas[i + 1];
    const at::Tensor d =
        combine(denoise_streams(dit, scales.streams(sigma), x, sigma, cond, max_batch, &fixed), scales);
    const at::Tensor velocity = (x - d) / sigma;
    // The step in double then rounded to float32, as Python's float(sigma_next - sigma).
    const auto dt = static_cast<float>(static_cast<double>(sigma_next) - static_cast<double>(sigma));
    x = x + velocity * dt;
    if (on_step) on_step(static_cast<int>(i));
  }
  return x;
}

}  // namespace stdrc
