#include "stdrc/engine.h"

#include <c10/util/Exception.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <filesystem>
#include <sstream>

#include "stdrc/errors.h"
#include "stdrc/npy.h"
#include "stdrc/safetensors.h"
#ifdef STDRC_WITH_TENSORRT
#include "stdrc/tensorrt_engine.h"
#endif

namespace stdrc {
namespace fs = std::filesystem;
namespace {

std::string dims(const std::vector<int64_t>& shape, const std::vector<std::string>& symbols = {}) {
  std::ostringstream out;
  out << "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) out << ", ";
    if (i < symbols.size() && !symbols[i].empty()) out << symbols[i];
    else out << shape[i];
  }
  out << "]";
  return out.str();
}

std::string first_line(const std::string& text) { return text.substr(0, text.find('\n')); }

}  // namespace

void check_inputs(const ComponentEntry& entry, const std::vector<at::Tensor>& inputs, const std::string& component) {
  if (inputs.size() != entry.inputs.size())
    throw InputError(component + ": " + std::to_string(inputs.size()) + " inputs given, the engine takes " +
                     std::to_string(entry.inputs.size()));
  for (size_t i = 0; i < inputs.size(); ++i) {
    const TensorSpec& spec = entry.inputs[i];
    const at::Tensor& t = inputs[i];
    bool ok = t.dim() == static_cast<int64_t>(spec.shape.size());
    for (size_t d = 0; ok && d < spec.shape.size(); ++d) {
      if (spec.symbols[d].empty()) {
        ok = t.size(d) == spec.shape[d];
      } else {
        auto range = entry.dynamic_dims.find(spec.symbols[d]);
        ok = range != entry.dynamic_dims.end() && range->second.size() == 3 && range->second[0] <= t.size(d) &&
             t.size(d) <= range->second[2];
      }
    }
    if (!ok)
      throw InputError(component + ": input '" + spec.name + "' has shape " + dims(t.sizes().vec()) +
                       ", the engine takes " + dims(spec.shape, spec.symbols));
    if (dtype_name(t.scalar_type()) != spec.dtype)
      throw InputError(component + ": input '" + spec.name + "' is " + dtype_name(t.scalar_type()) +
                       ", the engine takes " + spec.dtype);
  }
}

std::vector<at::Tensor> Engine::run(const std::vector<at::Tensor>& inputs) {
  check_inputs(entry_, inputs, name_);
  return run_checked(inputs);
}

AotiEngine::AotiEngine(const std::string& path, ComponentEntry entry, std::string name, c10::Device device,
                       const AotiEngine* base)
    : Engine(std::move(entry), std::move(name)) {
  // An exported program bakes its build device in (constants, tensor-metadata asserts): refuse any other.
  const auto built = this->entry().build.find("device");
  const std::string want = device.is_cuda() ? "cuda" : "cpu";
  const std::string have = built == this->entry().build.end() ? "" : built->second.substr(0, built->second.find(':'));
  if (have != want)
    throw BundleError(path + " was exported for " + (have.empty() ? "an unrecorded device" : have) + ", not " + want +
                      ": rebuild the bundle on a " + want + " machine (stdrc-export build-engines --backend aoti)");
  try {
    loader_ = std::make_unique<torch::inductor::AOTIModelPackageLoader>(path, "model", false, 1, device.index());
  } catch (const c10::Error& e) {
    throw BundleError(path + " could not be loaded by libtorch (" + first_line(e.what_without_backtrace()) +
                      "): rebuild the bundle with this torch version");
  }
  if (this->entry().build.count("constants_from"))
    share_constants(fs::path(path).parent_path().string(), device, base);
}

AotiEngine::~AotiEngine() = default;

std::unordered_map<std::string, at::Tensor> AotiEngine::constants() const {
  return loader_->get_runner()->extract_constants_map(false);
}

void AotiEngine::share_constants(const std::string& bundle_dir, c10::Device device, const AotiEngine* base) {
  const auto& build = entry().build;
  const std::string from = build.at("constants_from");
  const auto file = build.find("constants_file");
  if (file == build.end())
    throw BundleError(name() + ": constants_from without constants_file in its build facts: rebuild the bundle");
  if (base == nullptr) {
    ComponentEntry base_entry = entry();
    base_entry.file = from;
    base_entry.build.erase("constants_from");
    owned_base_ = std::make_unique<AotiEngine>(bundle_file(bundle_dir, from), base_entry, name() + " base", device);
    base = owned_base_.get();
  }
  const at::ScalarType dtype = entry().precision == "bf16" ? at::kBFloat16 : entry().precision == "fp16" ? at::kHalf
                                                                                                         : at::kFloat;
  for (auto& [key, tensor] : read_safetensors(bundle_file(bundle_dir, file->second)))
    own_constants_.emplace(key, tensor.to(device, dtype).contiguous());
  std::unordered_map<std::string, at::Tensor> all = base->constants();
  std::unordered_map<std::string, at::Tensor> wanted;
  for (const std::string& fqn : loader_->get_constant_fqns()) {
    const auto own = own_constants_.find(fqn);
    const auto shared = all.find(fqn);
    if ((own == own_constants_.end()) == (shared == all.end()))
      throw BundleError(name() + ": constant " + fqn + " is in " + (own == own_constants_.end() ? "neither" : "both") +
                        " " + from + " and " + file->second + ": rebuild the bundle");
    wanted.emplace(fqn, own != own_constants_.end() ? own->second : shared->second);
  }
  try {
    loader_->load_constants(wanted, false, true, true);  // active buffer, every constant given, user-managed
  } catch (const c10::Error& e) {
    throw BundleError(name() + ": its constants from " + from + " and " + file->second + " do not load (" +
                      first_line(e.what_without_backtrace()) + "): rebuild the bundle");
  }
}

std::vector<at::Tensor> AotiEngine::run_checked(const std::vector<at::Tensor>& inputs) {
  return loader_->run(inputs);
}

std::unique_ptr<Engine> open_engine(const std::string& bundle_dir, const std::string& name, const ComponentEntry& entry,
                                    c10::Device device, const Engine* constants_from) {
  const std::string path = bundle_file(bundle_dir, entry.file);
  if (entry.backend == "aoti")
    return std::make_unique<AotiEngine>(path, entry, name, device, dynamic_cast<const AotiEngine*>(constants_from));
#ifdef STDRC_WITH_TENSORRT
  if (entry.backend == "tensorrt")  // a weight-stripped plan is refit from its ONNX; a plan with weights is not
    return std::make_unique<TensorRTEngine>(path, needs_refit(entry) ? bundle_file(bundle_dir, refit_onnx(entry)) : "",
                                            entry, name, device);
#endif
  throw BundleError("bundle component " + name + " uses the " + entry.backend +
                    " backend, which this C++ runtime cannot run: rebuild the bundle with --backend aoti");
}

}  // namespace stdrc
