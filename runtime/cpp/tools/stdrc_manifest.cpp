// stdrc_manifest --bundle DIR [--bucket FRAMESxWIDTHxHEIGHT] [--stages 1|2]: what libstdrc reads from a
// manifest, as JSON: the stage count a run takes, the grid stage 1 samples at, the two-stage section, and
// "refit": component -> the ONNX a weight-stripped TensorRT plan is refit from at load, and "decode": the decode
// noise scale the runner mixes in and the timestep it feeds the VAE decoder (null: none; null when the
// manifest lists no vae_decoder).
//
// Opens no engine (the files need not exist), so tests/cpp/test_cpp_manifest.py can check the reader on
// hand-written manifests. Errors print one line, `stdrc_manifest: error: ...`, and exit 2.
#include <nlohmann/json.hpp>

#include <iostream>
#include <string>

#include "stdrc/errors.h"
#include "stdrc/manifest.h"

namespace {

nlohmann::json grid(const stdrc::Bucket& b) {
  return {{"label", b.label()},
          {"latent_grid", {b.latent_frames, b.latent_height, b.latent_width}},
          {"video_tokens", b.video_tokens},
          {"reference_tokens", b.reference_tokens},
          {"text_length", b.text_length},
          {"fps", b.fps},
          {"rope", b.rope_file.empty() ? nlohmann::json() : nlohmann::json(b.rope_file)}};
}

int run(int argc, char** argv) {
  std::string bundle, bucket;
  int stages = 0;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (i + 1 >= argc) throw stdrc::InputError(flag + " needs a value");
    const std::string value = argv[++i];
    if (flag == "--bundle") bundle = value;
    else if (flag == "--bucket") bucket = value;
    else if (flag == "--stages") stages = value == "1" ? 1 : value == "2" ? 2 : -1;
    else throw stdrc::InputError("unknown option " + flag + " (usage: stdrc_manifest --bundle DIR [--bucket L] [--stages N])");
    if (stages < 0) throw stdrc::InputError("--stages " + value + ": use 1 or 2");
  }
  if (bundle.empty()) throw stdrc::InputError("--bundle DIR is required");
  stdrc::Manifest m = stdrc::read_manifest(bundle);
  if (!bucket.empty()) m.select_bucket(bucket);
  const int resolved = m.resolve_stages(stages);
  nlohmann::json two = nullptr;
  if (m.two_stage.enabled)
    two = {{"sigmas", m.two_stage.sigmas}, {"default_stages", m.two_stage.default_stages},
           {"lora", m.two_stage.lora_name}, {"lora_strength", m.two_stage.lora_strength}};
  nlohmann::json out = {{"preset", m.preset},
                        {"stages", resolved},
                        {"bucket", grid(m.bucket)},
                        {"sampling_grid", grid(resolved == 2 ? m.bucket.half() : m.bucket)},
                        {"two_stage", two},
                        {"components", nlohmann::json::array()},
                        {"refit", nlohmann::json::object()}};
  if (m.components.count("vae_decoder"))
    out["decode"] = {{"noise_scale", m.timestep_conditioning ? nlohmann::json(m.decode_noise_scale) : nlohmann::json()},
                     {"timestep", m.decoder_takes_timestep() ? nlohmann::json(m.decode_timestep) : nlohmann::json()}};
  else
    out["decode"] = nullptr;
  for (const auto& [name, entry] : m.components) {
    out["components"].push_back(name);
    if (stdrc::needs_refit(entry)) out["refit"][name] = stdrc::refit_onnx(entry);
  }
  std::cout << out.dump() << "\n";
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const stdrc::Error& e) {
    const std::string what = e.what();
    std::cerr << "stdrc_manifest: error: " << what.substr(0, what.find('\n')) << std::endl;
    return 2;
  }
}
