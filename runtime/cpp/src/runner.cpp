#include "stdrc/runner.h"
#include "stdrc/tiling.h"

#include <ATen/TensorOperators.h>
#include <ATen/ops/full.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "stdrc/errors.h"
#include "stdrc/npy.h"

namespace stdrc {
namespace fs = std::filesystem;

namespace {

#ifdef STDRC_WITH_TENSORRT
const std::vector<std::string> kBackends = {"aoti", "tensorrt"};
#else
const std::vector<std::string> kBackends = {"aoti"};
#endif

std::string dims(at::IntArrayRef shape) {
  std::ostringstream out;
  out << "[";
  for (size_t i = 0; i < shape.size(); ++i) out << (i ? ", " : "") << shape[i];
  out << "]";
  return out.str();
}

// Reads `folder/name` as `want` (float32 or int64); converts within a kind (float64 -> float32).
at::Tensor read_as(const fs::path& folder, const std::string& name, at::ScalarType want) {
  const std::string path = (folder / name).string();
  at::Tensor t = read_npy(path);
  const bool is_float = at::isFloatingType(t.scalar_type());
  if ((want == at::kFloat) != is_float)
    throw InputError(path + " holds " + dtype_name(t.scalar_type()) + " values, the runner needs " +
                     dtype_name(want) + ": write it with stdrc.runtime.cpp_inputs");
  return t.to(want);
}

void expect_shape(const at::Tensor& t, const std::vector<int64_t>& want, const std::string& name) {
  if (t.sizes().vec() != want)
    throw InputError(name + " has shape " + dims(t.sizes()) + ", the bundle needs " + dims(want) +
                     ": write the inputs for this bundle with stdrc.runtime.cpp_inputs");
}

const TensorSpec& spec(const ComponentEntry& entry, const std::string& name) {
  for (const auto& t : entry.inputs)
    if (t.name == name) return t;
  throw BundleError("bundle engine lacks input '" + name + "': rebuild the bundle");
}

GuidanceScales guidance_from_json(const fs::path& path, GuidanceScales scales) {
  nlohmann::json data;
  try {
    std::ifstream in(path);
    data = nlohmann::json::parse(in);
    const auto& g = data.at("guidance");
    scales.text = g.at("text_scale").get<double>();
    scales.ref = g.at("ref_scale").get<double>();
    scales.rescale = g.value("rescale", 0.0);
    if (g.contains("interval") && !g["interval"].is_null()) {
      const auto lohi = g["interval"].get<std::vector<double>>();
      if (lohi.size() != 2) throw InputError(path.string() + ": guidance.interval must be [lo, hi]");
      scales.interval = std::make_pair(lohi[0], lohi[1]);
    }
  } catch (const nlohmann::json::exception& e) {
    throw InputError(path.string() + " is not a valid inputs file (" + e.what() + "): rewrite it with stdrc.runtime.cpp_inputs");
  }
  return scales;
}

}  // namespace

Runner::Runner(std::string bundle_dir, Manifest manifest, c10::Device device)
    : bundle_dir_(std::move(bundle_dir)), manifest_(std::move(manifest)), device_(device) {}

std::unique_ptr<Runner> Runner::from_bundle(const std::string& bundle_dir, c10::Device device, bool trust_code) {
  Manifest manifest = read_manifest(bundle_dir);
  check_components(bundle_dir, manifest, {"dit", "vae_decoder"}, kBackends);
  for (const char* name : {"dit", "vae_decoder"})
    if (manifest.component(name).backend == "aoti" && !trust_code)
      throw BundleError(std::string("bundle component ") + name + " is an aoti engine, and loading one runs code from "
                        "the bundle (a shared library; a sha256 cannot make that safe): open it only if you trust "
                        "who built it, with --trust-bundle-code");
  std::unique_ptr<Runner> runner(new Runner(bundle_dir, std::move(manifest), device));
  runner->dit_ = open_engine(bundle_dir, "dit", runner->manifest_.component("dit"), device);
  runner->decoder_ = open_engine(bundle_dir, "vae_decoder", runner->manifest_.component("vae_decoder"), device);
  return runner;
}

RunInputs Runner::read_inputs(const std::string& folder) const {
  const fs::path dir(folder);
  if (!fs::is_directory(dir))
    throw InputError("inputs folder " + folder + " does not exist: write one with stdrc.runtime.cpp_inputs.write_cpp_inputs");
  RunInputs in;
  in.noise = read_as(dir, files::kNoise, at::kFloat);
  in.cond.reference = read_as(dir, files::kReference, at::kFloat);
  in.cond.text_context = read_as(dir, files::kTextContext, at::kFloat);
  in.cond.text_mask = read_as(dir, files::kTextMask, at::kLong);
  in.cond.null_context = read_as(dir, files::kNullContext, at::kFloat);
  in.cond.null_mask = read_as(dir, files::kNullMask, at::kLong);
  if (manifest_.timestep_conditioning) in.decode_noise = read_as(dir, files::kDecodeNoise, at::kFloat);
  if (fs::is_regular_file(dir / files::kSigmas)) {
    in.sigmas = read_sigmas((dir / files::kSigmas).string());
  } else {
    in.sigmas = manifest_.sigmas;
  }
  if (rope_inputs()) {
    in.rope_cos = read_as(dir, files::kRopeCos, at::kFloat);
    in.rope_sin = read_as(dir, files::kRopeSin, at::kFloat);
  }
  in.scales.text = manifest_.text_scale;
  in.scales.ref = manifest_.ref_scale;
  if (fs::is_regular_file(dir / files::kInputsJson)) in.scales = guidance_from_json(dir / files::kInputsJson, in.scales);
  return in;
}

bool Runner::rope_inputs() const {
  for (const TensorSpec& t : manifest_.component("dit").inputs)
    if (t.name == "rope_cos") return true;
  return false;
}

bool Runner::sigma_input() const {
  const std::vector<TensorSpec>& inputs = manifest_.component("dit").inputs;
  return !inputs.empty() && inputs.back().name == "sigma";
}

void Runner::check_inputs(const RunInputs& in) const {
  const Bucket& b = manifest_.bucket;
  const int64_t c = manifest_.latent_channels;
  const TensorSpec& context = spec(manifest_.component("dit"), "context");
  const std::vector<int64_t> ctx = {1, context.shape.at(1), context.shape.at(2)}, mask = {1, context.shape.at(1)};
  expect_shape(in.noise, {1, b.video_tokens, c}, files::kNoise);
  expect_shape(in.cond.reference, {1, b.reference_tokens, c}, files::kReference);
  expect_shape(in.cond.text_context, ctx, files::kTextContext);
  expect_shape(in.cond.text_mask, mask, files::kTextMask);
  expect_shape(in.cond.null_context, ctx, files::kNullContext);
  expect_shape(in.cond.null_mask, mask, files::kNullMask);
  if (manifest_.timestep_conditioning) {
    const int64_t channels = spec(manifest_.component("vae_decoder"), "latent").shape.at(1);
    expect_shape(in.decode_noise, {1, channels, b.latent_frames, b.latent_height, b.latent_width}, files::kDecodeNoise);
  }
  if (rope_inputs()) {
    for (const auto& [tensor, file] : {std::make_pair(in.rope_cos, files::kRopeCos), std::make_pair(in.rope_sin, files::kRopeSin)}) {
      std::vector<int64_t> want = spec(manifest_.component("dit"), "rope_cos").shape;
      for (auto& d : want)
        if (d < 0) d = b.video_tokens + b.reference_tokens;  // the symbolic token count, at this bucket
      expect_shape(tensor, want, file);
    }
  }
  if (in.sigmas.size() < 2) throw InputError("sigmas: need at least 2 values (one step), got " + std::to_string(in.sigmas.size()));
}

at::Tensor Runner::sample(const RunInputs& in, int max_batch, const std::function<void(int)>& on_step) {
  if (max_batch < 1 || max_batch > 3)
    throw InputError("max_batch=" + std::to_string(max_batch) + ": use 1, 2 or 3 guidance streams per DiT call");
  check_inputs(in);
  auto to_dev = [this](const at::Tensor& t) { return t.to(device_); };
  const Conditioning cond{to_dev(in.cond.reference), to_dev(in.cond.text_context), to_dev(in.cond.text_mask),
                          to_dev(in.cond.null_context), to_dev(in.cond.null_mask)};
  // a bucket's RoPE tables go to the device once, then every DiT call takes the same tensors
  const at::Tensor cos = in.rope_cos.defined() ? to_dev(in.rope_cos) : at::Tensor();
  const at::Tensor sin = in.rope_sin.defined() ? to_dev(in.rope_sin) : at::Tensor();
  const bool with_sigma = sigma_input();
  // the DiT's inputs in the manifest's order: the five of every DiT, the RoPE tables, then sigma (LTX-2.3)
  const Denoiser dit = [this, cos, sin, with_sigma](const at::Tensor& latent, const at::Tensor& timestep,
                                                    const at::Tensor& context, const at::Tensor& context_mask,
                                                    const at::Tensor& attn_mask, const at::Tensor& sigma) {
    std::vector<at::Tensor> feeds{latent, timestep, context, context_mask, attn_mask};
    if (cos.defined()) feeds.insert(feeds.end(), {cos, sin});
    if (with_sigma) feeds.push_back(sigma);
    return dit_->run(feeds).at(0);
  };
  return stdrc::sample(dit, to_dev(in.noise), in.sigmas, cond, in.scales, max_batch, on_step);
}

at::Tensor Runner::decode(const at::Tensor& tokens, const at::Tensor& decode_noise) {
  const Bucket& b = manifest_.bucket;
  at::Tensor latent = tokens.to(device_, at::kFloat).transpose(1, 2).reshape(
      {1, tokens.size(2), b.latent_frames, b.latent_height, b.latent_width});
  if (manifest_.timestep_conditioning) {
    const float scale = manifest_.decode_noise_scale;
    latent = decode_noise.to(device_) * scale + latent * (1.0f - scale);
  }
  // a timestep only where the decoder engine has one (a timestep-conditioned decoder; LTX-2.3's is not)
  const auto& inputs = manifest_.component("vae_decoder").inputs;
  const bool with_timestep =
      std::any_of(inputs.begin(), inputs.end(), [](const TensorSpec& t) { return t.name == "timestep"; });
  const at::Tensor timestep = at::full({1}, manifest_.decode_timestep, latent.options());
  const auto decode_part = [this, &timestep, with_timestep](const at::Tensor& part) {
    return with_timestep ? decoder_->run({part, timestep}).at(0) : decoder_->run({part}).at(0);
  };
  if (manifest_.decode_tiling.enabled()) return tiled_decode(decode_part, latent, manifest_.decode_tiling);
  return decode_part(latent.contiguous());
}

RunOutputs Runner::run(const RunInputs& in, int max_batch, const std::function<void(int)>& on_step) {
  RunOutputs out;
  out.latent = sample(in, max_batch, on_step);
  out.video = decode(out.latent, in.decode_noise);
  out.frames = frames_to_uint8(out.video);
  return out;
}

std::vector<float> read_sigmas(const std::string& path) {
  const fs::path file(path);
  const at::Tensor s = read_as(file.parent_path(), file.filename().string(), at::kFloat).contiguous();
  if (s.dim() != 1 || s.numel() < 2)
    throw InputError(path + " has shape " + dims(s.sizes()) + ": sigmas are 1-D with steps + 1 >= 2 values");
  return {s.data_ptr<float>(), s.data_ptr<float>() + s.numel()};
}

at::Tensor frames_to_uint8(const at::Tensor& video) {
  const at::Tensor frames = video.select(0, 0).permute({1, 2, 3, 0});
  return ((frames + 1.0f) * 127.5f + 0.5f).clamp(0, 255).to(at::kByte).contiguous();
}

void write_outputs(const RunOutputs& out, const std::string& folder) {
  std::error_code ec;
  fs::create_directories(folder, ec);
  if (!fs::is_directory(folder)) throw InputError("output folder " + folder + " cannot be created: pass --out in a writable place");
  write_npy((fs::path(folder) / files::kLatent).string(), out.latent);
  write_npy((fs::path(folder) / files::kVideo).string(), out.video);
  write_npy((fs::path(folder) / files::kFrames).string(), out.frames);
}

}  // namespace stdrc
