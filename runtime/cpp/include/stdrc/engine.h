// Engines behind one interface: tensors in (in the manifest's input order), tensors out.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "stdrc/manifest.h"

namespace torch::inductor {
class AOTIModelPackageLoader;
}

namespace stdrc {

class Engine {
 public:
  explicit Engine(ComponentEntry entry, std::string name) : entry_(std::move(entry)), name_(std::move(name)) {}
  virtual ~Engine() = default;
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Checks names/ranks/static dims/dtypes against the manifest, then runs. Outputs are fresh
  // tensors owned by the caller, in the manifest's output order.
  std::vector<at::Tensor> run(const std::vector<at::Tensor>& inputs);

  const ComponentEntry& entry() const { return entry_; }
  const std::string& name() const { return name_; }

 protected:
  virtual std::vector<at::Tensor> run_checked(const std::vector<at::Tensor>& inputs) = 0;

 private:
  ComponentEntry entry_;
  std::string name_;
};

// An AOTInductor `.pt2` package (torch._inductor.aoti_compile_and_package) run through libtorch.
//
// A package compiled without its constants (`dit_refine`: build facts constants_from / constants_file,
// stdrc/engines/aoti.py) is given them at load, user-managed (pointers, no copy): the constants of the package
// `constants_from` names (`base`, the loaded engine of that file, or else a loader of it owned here) and the
// tensors of `constants_file`, cast to the engine's precision. `base` must outlive this engine.
class AotiEngine final : public Engine {
 public:
  AotiEngine(const std::string& path, ComponentEntry entry, std::string name, c10::Device device,
             const AotiEngine* base = nullptr);
  ~AotiEngine() override;

  // The package's constants by their original FQN (aliases of its own buffers, valid while this engine lives).
  std::unordered_map<std::string, at::Tensor> constants() const;

 protected:
  std::vector<at::Tensor> run_checked(const std::vector<at::Tensor>& inputs) override;

 private:
  void share_constants(const std::string& bundle_dir, c10::Device device, const AotiEngine* base);

  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> loader_;
  std::unique_ptr<AotiEngine> owned_base_;                 // constants_from opened here when no `base` was given
  std::unordered_map<std::string, at::Tensor> own_constants_;  // constants_file's tensors, kept alive
};

// Throws InputError when `inputs` do not fit `entry` (count, rank, static dims, symbolic dims
// within their dynamic range, dtype).
void check_inputs(const ComponentEntry& entry, const std::vector<at::Tensor>& inputs, const std::string& component);

// Opens `<bundle_dir>/<entry.file>` with the engine class for its backend. `constants_from`: the loaded engine
// of the file entry.build["constants_from"] names, whose constants an aoti package without its own takes.
std::unique_ptr<Engine> open_engine(const std::string& bundle_dir, const std::string& name, const ComponentEntry& entry,
                                    c10::Device device, const Engine* constants_from = nullptr);

}  // namespace stdrc
