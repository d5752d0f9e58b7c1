// A TensorRT plan behind the Engine interface. Built only with -DSTDRC_WITH_TENSORRT=ON.
//
// UNTESTED: this project's CI and development machines have neither TensorRT nor a GPU, so this
// file has never been compiled or run here. It is kept thin (TensorRT 10 enqueueV3 API, CUDA
// runtime stream, libtorch CUDA tensors as buffers, the ONNX parser's refitter for weight-stripped
// plans) so that the GPU owner can finish it. Which plans need a refit is decided in manifest.cpp
// (needs_refit, refit_onnx), which CI compiles and tests.
#pragma once

#ifdef STDRC_WITH_TENSORRT

#include <memory>
#include <string>
#include <vector>

#include "stdrc/engine.h"

namespace nvinfer1 {
class IRuntime;
class ICudaEngine;
class IExecutionContext;
}  // namespace nvinfer1

namespace stdrc {

class TensorRTEngine final : public Engine {
 public:
  // Sets the device first, then refuses a plan whose manifest `build.tensorrt_version` differs from the
  // linked TensorRT or whose `build.compute_capability` differs from the device's. A weight-stripped plan
  // (needs_refit(entry)) is refit from `refit_onnx` (its ONNX, external data beside it) before any context
  // exists; BundleError when that path is empty, TensorRT cannot read it, or weights stay missing.
  TensorRTEngine(const std::string& path, const std::string& refit_onnx, ComponentEntry entry, std::string name,
                 c10::Device device);
  ~TensorRTEngine() override;

 protected:
  // Inputs are cast to the plan's I/O dtypes and moved to the device; outputs are fresh CUDA
  // tensors owned by the caller. Runs on libtorch's current stream of the device (where the inputs were
  // cast) and synchronises before returning.
  std::vector<at::Tensor> run_checked(const std::vector<at::Tensor>& inputs) override;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace stdrc

#endif  // STDRC_WITH_TENSORRT
