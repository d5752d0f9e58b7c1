// UNTESTED here (no TensorRT, no GPU): see tensorrt_engine.h.
#include "stdrc/tensorrt_engine.h"

#include <ATen/ops/empty.h>
#include <NvInfer.h>
#include <NvOnnxParser.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <filesystem>
#include <fstream>
#include <iostream>
#include <iterator>

#include "stdrc/errors.h"

namespace stdrc {
namespace {

class Logger final : public nvinfer1::ILogger {
 public:
  void log(Severity severity, const char* msg) noexcept override {
    if (severity <= Severity::kWARNING) std::cerr << "TensorRT: " << msg << "\n";
  }
};

at::ScalarType to_torch(nvinfer1::DataType type, const std::string& name) {
  switch (type) {
    case nvinfer1::DataType::kFLOAT: return at::kFloat;
    case nvinfer1::DataType::kHALF: return at::kHalf;
    case nvinfer1::DataType::kBF16: return at::kBFloat16;
    case nvinfer1::DataType::kINT32: return at::kInt;
    case nvinfer1::DataType::kINT64: return at::kLong;
    case nvinfer1::DataType::kBOOL: return at::kBool;
    case nvinfer1::DataType::kUINT8: return at::kByte;
    default: throw BundleError("TensorRT tensor '" + name + "' has an I/O dtype this runner cannot bind: rebuild the plan");
  }
}

void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw Error(std::string(what) + " failed: " + cudaGetErrorString(err) + " (check the GPU with nvidia-smi)");
}

// Fills a weight-stripped engine's weights from `onnx` with TensorRT 10's ONNX parser refitter, as
// runtime/backends/tensorrt.py refit_from_onnx does; external data (a two-stage bundle's shared dit.onnx.data)
// is read from the ONNX's folder. The parser refitter owns the weights it read, so it is kept until
// refitCudaEngine returns (declared after the refitter: destroyed first).
void refit_from_onnx(nvinfer1::ICudaEngine& engine, const std::string& onnx, nvinfer1::ILogger& logger) {
  const std::string name = std::filesystem::path(onnx).filename().string();
  const std::string fix = ": rebuild the bundle with `stdrc-export build-engines --backend tensorrt`";
  std::unique_ptr<nvinfer1::IRefitter> refitter(nvinfer1::createInferRefitter(engine, logger));
  if (!refitter) throw BundleError("TensorRT could not create a refitter for the plan of " + name + " (not built REFIT?)" + fix);
  std::unique_ptr<nvonnxparser::IParserRefitter> parser(nvonnxparser::createParserRefitter(*refitter, logger));
  if (!parser) throw BundleError("TensorRT could not create an ONNX refitter for " + name + fix);
  if (!parser->refitFromFile(onnx.c_str())) {
    std::string why = "see its log above";
    if (parser->getNbErrors() > 0 && parser->getError(0) != nullptr) {
      why = parser->getError(0)->desc();
      why = why.substr(0, why.find('\n'));
    }
    throw BundleError("TensorRT could not read the weights of " + name + " for its plan (" + why + ")" + fix);
  }
  const int32_t missing = refitter->getMissingWeights(0, nullptr);
  if (missing > 0) {
    std::vector<char const*> names(static_cast<size_t>(missing), nullptr);
    refitter->getMissingWeights(missing, names.data());
    throw BundleError(name + " left " + std::to_string(missing) + " weights of its plan unset (first: " +
                      (names[0] ? names[0] : "?") + "), so it would run without them" + fix);
  }
  if (!refitter->refitCudaEngine())
    throw BundleError("TensorRT could not refit the plan of " + name + " (see its log above)" + fix);
}

}  // namespace

struct TensorRTEngine::Impl {
  Logger logger;
  std::unique_ptr<nvinfer1::IRuntime> runtime;
  std::unique_ptr<nvinfer1::ICudaEngine> engine;
  std::unique_ptr<nvinfer1::IExecutionContext> context;
  c10::Device device = c10::kCUDA;
};

TensorRTEngine::TensorRTEngine(const std::string& path, const std::string& refit_onnx, ComponentEntry entry,
                               std::string name, c10::Device device)
    : Engine(std::move(entry), std::move(name)), impl_(std::make_unique<Impl>()) {
  if (!device.is_cuda()) throw InputError("TensorRT plans run on a CUDA device: pass --device cuda");
  impl_->device = device;
  // The device first: the plan's memory and the execution context live on the current device.
  check_cuda(cudaSetDevice(device.has_index() ? device.index() : 0), "cudaSetDevice");
  int dev = 0;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  cudaDeviceProp prop{};
  check_cuda(cudaGetDeviceProperties(&prop, dev), "cudaGetDeviceProperties");
  const std::string have = std::to_string(prop.major) + "." + std::to_string(prop.minor);
  auto capability = this->entry().build.find("compute_capability");
  if (capability == this->entry().build.end() || capability->second != have)
    throw BundleError(path + " was built for compute capability " +
                      (capability == this->entry().build.end() ? "?" : capability->second) + " and this GPU (" +
                      prop.name + ") is " + have + ": rebuild the bundle on this GPU");
  const std::string linked = std::to_string(NV_TENSORRT_MAJOR) + "." + std::to_string(NV_TENSORRT_MINOR) + ".";
  auto built = this->entry().build.find("tensorrt_version");
  if (built == this->entry().build.end() || built->second.rfind(linked, 0) != 0)
    throw BundleError(path + " was built with TensorRT " + (built == this->entry().build.end() ? "?" : built->second) +
                      ", this runner links " + linked + "x: rebuild the bundle on this machine");
  std::ifstream in(path, std::ios::binary);
  const std::vector<char> plan((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  impl_->runtime.reset(nvinfer1::createInferRuntime(impl_->logger));
  impl_->engine.reset(impl_->runtime->deserializeCudaEngine(plan.data(), plan.size()));
  if (!impl_->engine) throw BundleError("TensorRT could not deserialize " + path + " (see its log above): rebuild the bundle");
  if (needs_refit(this->entry())) {  // no context before its weights are in: it would run without them
    if (refit_onnx.empty())
      throw BundleError(path + " is built without its weights (" + kWeightlessFlag + ") and no ONNX to refit it from "
                        "was given: open it through open_engine, or rebuild the bundle");
    refit_from_onnx(*impl_->engine, refit_onnx, impl_->logger);
  }
  impl_->context.reset(impl_->engine->createExecutionContext());
  if (!impl_->context) throw BundleError("TensorRT could not create an execution context for " + path);
}

TensorRTEngine::~TensorRTEngine() = default;

std::vector<at::Tensor> TensorRTEngine::run_checked(const std::vector<at::Tensor>& inputs) {
  auto& ctx = *impl_->context;
  // libtorch's current stream on the device: the input casts/copies below are queued there, so TensorRT
  // enqueued on the same stream sees them done, and the outputs' allocator stream is the one they are used on.
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(impl_->device.index()).stream();
  std::vector<at::Tensor> bound;  // keeps cast/moved inputs alive until the stream is done
  for (size_t i = 0; i < inputs.size(); ++i) {
    const char* name = entry().inputs[i].name.c_str();
    at::Tensor t = inputs[i].to(impl_->device, to_torch(impl_->engine->getTensorDataType(name), name)).contiguous();
    nvinfer1::Dims dims{};
    dims.nbDims = static_cast<int32_t>(t.dim());
    for (int64_t d = 0; d < t.dim(); ++d) dims.d[d] = t.size(d);
    if (!ctx.setInputShape(name, dims) || !ctx.setTensorAddress(name, t.data_ptr()))
      throw InputError(this->name() + ": TensorRT refused input '" + std::string(name) + "' (shape outside the plan's profile?)");
    bound.push_back(std::move(t));
  }
  std::vector<at::Tensor> outputs;
  for (const auto& spec : entry().outputs) {
    const char* name = spec.name.c_str();
    const nvinfer1::Dims dims = ctx.getTensorShape(name);
    std::vector<int64_t> shape(dims.d, dims.d + dims.nbDims);
    at::Tensor out = at::empty(shape, at::TensorOptions().dtype(to_torch(impl_->engine->getTensorDataType(name), name)).device(impl_->device));
    ctx.setTensorAddress(name, out.data_ptr());
    outputs.push_back(out);
  }
  if (!ctx.enqueueV3(stream)) throw Error(this->name() + ": TensorRT enqueueV3 failed (see its log above)");
  check_cuda(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
  for (auto& out : outputs)
    if (out.scalar_type() != at::kFloat && at::isFloatingType(out.scalar_type())) out = out.to(at::kFloat);
  return outputs;
}

}  // namespace stdrc
