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

// The stage count an inputs folder was written for (inputs.json "stages"), 0 when it does not say.
int stages_written(const fs::path& path) {
  if (!fs::is_regular_file(path)) return 0;
  try {
    std::ifstream in(path);
    const nlohmann::json data = nlohmann::json::parse(in);
    if (!data.is_object() || !data.contains("stages") || data["stages"].is_null()) return 0;
    const int stages = data["stages"].get<int>();
    if (stages != 1 && stages != 2) throw InputError(path.string() + ": stages is " + std::to_string(stages) +
                                                     ", expected 1 or 2: rewrite it with stdrc.runtime.cpp_inputs");
    return stages;
  } catch (const nlohmann::json::exception& e) {
    throw InputError(path.string() + " is not a valid inputs file (" + e.what() + "): rewrite it with stdrc.runtime.cpp_inputs");
  }
}

void expect_rope(const at::Tensor& table, const ComponentEntry& dit, const Bucket& grid, const std::string& file) {
  std::vector<int64_t> want = spec(dit, "rope_cos").shape;
  for (auto& d : want)
    if (d < 0) d = grid.video_tokens + grid.reference_tokens;  // the symbolic token count, at this grid
  expect_shape(table, want, file);
}

}  // namespace

Runner::Runner(std::string bundle_dir, Manifest manifest, c10::Device device)
    : bundle_dir_(std::move(bundle_dir)), manifest_(std::move(manifest)), device_(device) {}

std::unique_ptr<Runner> Runner::from_bundle(const std::string& bundle_dir, c10::Device device, bool trust_code) {
  Manifest manifest = read_manifest(bundle_dir);
  std::vector<std::string> names = {"dit", "vae_decoder"};
  if (manifest.two_stage.enabled) names.insert(names.end(), stage_components().begin(), stage_components().end());
  check_components(bundle_dir, manifest, names, kBackends);
  for (const std::string& name : names)
    if (manifest.component(name).backend == "aoti" && !trust_code)
      throw BundleError("bundle component " + name + " is an aoti engine, and loading one runs code from "
                        "the bundle (a shared library; a sha256 cannot make that safe): open it only if you trust "
                        "who built it, with --trust-bundle-code");
  std::unique_ptr<Runner> runner(new Runner(bundle_dir, std::move(manifest), device));
  runner->engine("dit");
  runner->engine("vae_decoder");
  return runner;
}

Engine& Runner::engine(const std::string& name) {
  auto it = engines_.find(name);
  if (it != engines_.end()) return *it->second;
  const ComponentEntry& entry = manifest_.component(name);
  const Engine* base = nullptr;  // an aoti package without constants shares those of the component it names
  const auto from = entry.build.find("constants_from");
  if (from != entry.build.end())
    for (const auto& [other, e] : manifest_.components)
      if (other != name && e.file == from->second) base = &engine(other);
  return *engines_.emplace(name, open_engine(bundle_dir_, name, entry, device_, base)).first->second;
}

RunInputs Runner::read_inputs(const std::string& folder, int stages) const {
  const fs::path dir(folder);
  if (!fs::is_directory(dir))
    throw InputError("inputs folder " + folder + " does not exist: write one with stdrc.runtime.cpp_inputs.write_cpp_inputs");
  RunInputs in;
  const int written = stages_written(dir / files::kInputsJson);
  if (stages != 0 && written != 0 && stages != written)
    throw InputError("--stages " + std::to_string(stages) + ": the inputs in " + folder + " were written for " +
                     std::to_string(written) + " stage(s); pass --stages " + std::to_string(written) +
                     " or write them with GenerationOptions(stages=" + std::to_string(stages) + ")");
  in.stages = manifest_.resolve_stages(stages != 0 ? stages : written);
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
  if (in.stages == 2) {
    in.refine.noise = read_as(dir, files::kStage2Noise, at::kFloat);
    in.refine.reference = read_as(dir, files::kStage2Reference, at::kFloat);
    if (rope_inputs("dit_refine")) {
      in.refine.rope_cos = read_as(dir, files::kStage2RopeCos, at::kFloat);
      in.refine.rope_sin = read_as(dir, files::kStage2RopeSin, at::kFloat);
    }
  }
  in.scales.text = manifest_.text_scale;
  in.scales.ref = manifest_.ref_scale;
  if (fs::is_regular_file(dir / files::kInputsJson)) in.scales = guidance_from_json(dir / files::kInputsJson, in.scales);
  return in;
}

bool Runner::rope_inputs(const std::string& dit) const {
  for (const TensorSpec& t : manifest_.component(dit).inputs)
    if (t.name == "rope_cos") return true;
  return false;
}

bool Runner::sigma_input(const std::string& dit) const {
  const std::vector<TensorSpec>& inputs = manifest_.component(dit).inputs;
  return !inputs.empty() && inputs.back().name == "sigma";
}

void Runner::check_inputs(const RunInputs& in) const {
  const int stages = manifest_.resolve_stages(in.stages);
  const Bucket& b = manifest_.bucket;
  const Bucket grid = sampling_grid(stages);
  const int64_t c = manifest_.latent_channels;
  const ComponentEntry& dit = manifest_.component("dit");
  const TensorSpec& context = spec(dit, "context");
  const std::vector<int64_t> ctx = {1, context.shape.at(1), context.shape.at(2)}, mask = {1, context.shape.at(1)};
  expect_shape(in.noise, {1, grid.video_tokens, c}, files::kNoise);
  expect_shape(in.cond.reference, {1, grid.reference_tokens, c}, files::kReference);
  expect_shape(in.cond.text_context, ctx, files::kTextContext);
  expect_shape(in.cond.text_mask, mask, files::kTextMask);
  expect_shape(in.cond.null_context, ctx, files::kNullContext);
  expect_shape(in.cond.null_mask, mask, files::kNullMask);
  if (manifest_.timestep_conditioning) {
    const int64_t channels = spec(manifest_.component("vae_decoder"), "latent").shape.at(1);
    expect_shape(in.decode_noise, {1, channels, b.latent_frames, b.latent_height, b.latent_width}, files::kDecodeNoise);
  }
  if (rope_inputs()) {
    expect_rope(in.rope_cos, dit, grid, files::kRopeCos);
    expect_rope(in.rope_sin, dit, grid, files::kRopeSin);
  }
  if (stages == 2) {
    expect_shape(in.refine.noise, {1, b.video_tokens, c}, files::kStage2Noise);
    expect_shape(in.refine.reference, {1, b.reference_tokens, c}, files::kStage2Reference);
    if (rope_inputs("dit_refine")) {
      expect_rope(in.refine.rope_cos, manifest_.component("dit_refine"), b, files::kStage2RopeCos);
      expect_rope(in.refine.rope_sin, manifest_.component("dit_refine"), b, files::kStage2RopeSin);
    }
  }
  if (in.sigmas.size() < 2) throw InputError("sigmas: need at least 2 values (one step), got " + std::to_string(in.sigmas.size()));
}

namespace {

// `engine` as a Denoiser: the DiT's inputs in the manifest's order, the five of every DiT, the RoPE tables
// (placed on the device once, the same tensors at every call), then sigma (LTX-2.3).
Denoiser denoiser(Engine& engine, const at::Tensor& cos, const at::Tensor& sin, bool with_sigma) {
  return [&engine, cos, sin, with_sigma](const at::Tensor& latent, const at::Tensor& timestep,
                                         const at::Tensor& context, const at::Tensor& context_mask,
                                         const at::Tensor& attn_mask, const at::Tensor& sigma) {
    std::vector<at::Tensor> feeds{latent, timestep, context, context_mask, attn_mask};
    if (cos.defined()) feeds.insert(feeds.end(), {cos, sin});
    if (with_sigma) feeds.push_back(sigma);
    return engine.run(feeds).at(0);
  };
}

}  // namespace

at::Tensor Runner::sample(const RunInputs& in, int max_batch, const std::function<void(int)>& on_step) {
  if (max_batch < 1 || max_batch > 3)
    throw InputError("max_batch=" + std::to_string(max_batch) + ": use 1, 2 or 3 guidance streams per DiT call");
  check_inputs(in);
  auto to_dev = [this](const at::Tensor& t) { return t.defined() ? t.to(device_) : t; };
  const Conditioning cond{to_dev(in.cond.reference), to_dev(in.cond.text_context), to_dev(in.cond.text_mask),
                          to_dev(in.cond.null_context), to_dev(in.cond.null_mask)};
  const Denoiser dit = denoiser(engine("dit"), to_dev(in.rope_cos), to_dev(in.rope_sin), sigma_input());
  return stdrc::sample(dit, to_dev(in.noise), in.sigmas, cond, in.scales, max_batch, on_step);
}

at::Tensor Runner::upsample(const at::Tensor& tokens) {
  if (!manifest_.two_stage.enabled) manifest_.resolve_stages(2);  // the one-line error naming the fix
  const Bucket h = manifest_.bucket.half(), b = manifest_.bucket;
  const int64_t c = manifest_.latent_channels;
  expect_shape(tokens, {1, h.video_tokens, c}, "stage-1 latent");
  const at::Tensor latent = tokens.to(device_, at::kFloat).transpose(1, 2).reshape(
      {1, c, h.latent_frames, h.latent_height, h.latent_width}).contiguous();
  const at::Tensor up = engine("upsampler").run({latent}).at(0).to(at::kFloat);
  expect_shape(up, {1, c, b.latent_frames, b.latent_height, b.latent_width}, "upsampler output");
  return up.reshape({1, c, b.video_tokens}).transpose(1, 2).contiguous();  // patchify
}

at::Tensor Runner::refine(const at::Tensor& upsampled, const RunInputs& in, const std::function<void(int)>& on_step) {
  manifest_.resolve_stages(2);  // a one-stage bundle: the one-line error naming the fix
  if (in.stages != 2) throw InputError("refine: these inputs are for one stage; write them with GenerationOptions(stages=2)");
  check_inputs(in);
  const std::vector<float>& sigmas = manifest_.two_stage.sigmas;
  auto to_dev = [this](const at::Tensor& t) { return t.defined() ? t.to(device_) : t; };
  // ltx-core's noiser: x = n * s0 + x_up * (1 - s0), in float32 as the Python runtime (sampler.sample's start)
  const float s0 = sigmas.front();
  const at::Tensor x = to_dev(in.refine.noise) * s0 + upsampled.to(device_, at::kFloat) * (1.0f - s0);
  // one stream, FULL (text + reference, no guidance): the null prompt is never used
  const at::Tensor text = to_dev(in.cond.text_context), mask = to_dev(in.cond.text_mask);
  const Conditioning cond{to_dev(in.refine.reference), text, mask, text, mask};
  GuidanceScales one_stream;
  one_stream.text = one_stream.ref = 1.0;
  const Denoiser dit = denoiser(engine("dit_refine"), to_dev(in.refine.rope_cos), to_dev(in.refine.rope_sin),
                                sigma_input("dit_refine"));
  return stdrc::sample_from(dit, x, sigmas, cond, one_stream, 1, on_step);
}

int Runner::total_steps(const RunInputs& in) const {
  const int stage1 = static_cast<int>(in.sigmas.size()) - 1;
  return in.stages == 2 ? stage1 + static_cast<int>(manifest_.two_stage.sigmas.size()) - 1 : stage1;
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
  const bool with_timestep = manifest_.decoder_takes_timestep();
  const at::Tensor timestep = at::full({1}, manifest_.decode_timestep, latent.options());
  Engine& decoder = engine("vae_decoder");
  const auto decode_part = [&decoder, &timestep, with_timestep](const at::Tensor& part) {
    return with_timestep ? decoder.run({part, timestep}).at(0) : decoder.run({part}).at(0);
  };
  if (manifest_.decode_tiling.enabled()) return tiled_decode(decode_part, latent, manifest_.decode_tiling);
  return decode_part(latent.contiguous());
}

RunOutputs Runner::run(const RunInputs& in, int max_batch, const std::function<void(int)>& on_step) {
  RunOutputs out;
  out.latent = sample(in, max_batch, on_step);
  if (in.stages == 2) {
    out.stage1_latent = out.latent;
    const int offset = static_cast<int>(in.sigmas.size()) - 1;
    const std::function<void(int)> refine_step = [&on_step, offset](int i) {
      if (on_step) on_step(offset + i);
    };
    out.latent = refine(upsample(out.stage1_latent), in, refine_step);
  }
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
  if (out.stage1_latent.defined()) write_npy((fs::path(folder) / files::kStage1Latent).string(), out.stage1_latent);
}

}  // namespace stdrc
