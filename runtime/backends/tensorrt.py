"""TensorRT engines at run time: deserialize a plan, bind cuda-python device buffers, execute.

UNTESTED in this project's CI: TensorRT cannot be installed there (PyPI's tensorrt packages are
stubs that download from NVIDIA at install time) and there is no GPU. Only the plain-data parts
(`check_build`, `normalize_capability`, `numpy_dtype`) and the missing-package errors are tested. The layer is
kept thin on purpose: TensorRT 10/11 Python API plus cuda-python, both imported lazily; no torch.

Buffer ownership: device buffers belong to the engine (allocated for the largest shapes seen,
freed by `close()`); `run` copies outputs into fresh numpy arrays owned by the caller.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from stdrc.runtime.backends import check_feeds
from stdrc.runtime.errors import BackendUnavailableError, BundleError
from stdrc.runtime.manifest import ComponentEntry
from stdrc.runtime.schema import Ranges

log = logging.getLogger(__name__)

# Keys of a TensorRT component's manifest `build` field, written by stdrc.engines.tensorrt.
TRT_VERSION_KEY = "tensorrt_version"
COMPUTE_CAPABILITY_KEY = "compute_capability"
GPU_NAME_KEY = "gpu_name"


def import_tensorrt() -> ModuleType:
    try:
        import tensorrt
    except ImportError as e:
        raise BackendUnavailableError(
            "TensorRT is not installable here (PyPI's tensorrt packages only download it from NVIDIA): "
            "install `tensorrt` on a machine with an NVIDIA GPU, or use --backend onnxruntime"
        ) from e
    return tensorrt


def import_cudart() -> ModuleType:
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError as e:
            raise BackendUnavailableError(
                "the tensorrt backend needs cuda-python: pip install 'stdrc[gpu]' on the GPU machine"
            ) from e
    return cudart


def _ok(result: tuple) -> Any:
    """cuda-python returns (error, *values): raise on error, return the value(s)."""
    err, *values = result
    if getattr(err, "value", err) != 0:
        raise BackendUnavailableError(f"CUDA call failed with {err}: check the GPU and driver (nvidia-smi)")
    return values[0] if len(values) == 1 else tuple(values)


# TensorRT DataType names -> numpy dtypes. `trt.nptype` raises for BF16 and FP8, which numpy lacks:
# those come from ml_dtypes (an onnx dependency; listed in the `gpu` extra).
NUMPY_DTYPES = {"FLOAT": "float32", "HALF": "float16", "INT8": "int8", "INT32": "int32", "INT64": "int64",
                "BOOL": "bool", "UINT8": "uint8", "BF16": "bfloat16", "FP8": "float8_e4m3fn"}


def numpy_dtype(trt_name: str) -> np.dtype:
    """A TensorRT DataType's name (e.g. `engine.get_tensor_dtype(n).name`) -> the numpy dtype of its buffers."""
    name = NUMPY_DTYPES.get(trt_name)
    if name is None:
        raise BundleError(f"TensorRT tensor dtype {trt_name} has no host buffer type here: rebuild the plan with "
                          f"{', '.join(NUMPY_DTYPES)} I/O")
    if name in ("bfloat16", "float8_e4m3fn"):
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, name))
    return np.dtype(name)


def to_float32(array: np.ndarray) -> np.ndarray:
    """Low-precision floating outputs (fp16, bf16, fp8) come back as float32, as from the other backends."""
    floating = array.dtype.kind == "f" or array.dtype.name in ("bfloat16", "float8_e4m3fn")
    return array.astype(np.float32) if floating and array.dtype != np.float32 else array


def normalize_capability(capability: str | tuple[int, int]) -> str:
    """(8, 9) or "8.9" -> "8.9"."""
    if isinstance(capability, str):
        major, _, minor = capability.partition(".")
        return f"{int(major)}.{int(minor or 0)}"
    major, minor = capability
    return f"{int(major)}.{int(minor)}"


def gpu_facts(device: int | None = None) -> dict[str, str]:
    """Name and compute capability of the current (or given) CUDA device, via cuda-python."""
    cudart = import_cudart()
    dev = _ok(cudart.cudaGetDevice()) if device is None else device
    prop = _ok(cudart.cudaGetDeviceProperties(dev))
    name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
    return {GPU_NAME_KEY: name.rstrip("\x00"), COMPUTE_CAPABILITY_KEY: f"{prop.major}.{prop.minor}"}


def check_build(entry: ComponentEntry, trt_version: str, gpu: dict[str, str]) -> None:
    """A plan runs only with the TensorRT version and GPU architecture that built it."""
    built = entry.build
    if built.tensorrt_version is None or built.compute_capability is None:
        raise BundleError(f"{entry.file}: the manifest records no TensorRT version / compute capability: "
                          "rebuild the bundle with `stdrc-export build-engines --backend tensorrt`")
    if built.tensorrt_version != trt_version:
        raise BundleError(
            f"{entry.file} was built with TensorRT {built.tensorrt_version} and this machine has "
            f"{trt_version}: "
            "plans load only in the TensorRT version that built them; rebuild the bundle on this machine "
            "with `stdrc-export build-engines --backend tensorrt`"
        )
    want = normalize_capability(built.compute_capability)
    have = normalize_capability(gpu[COMPUTE_CAPABILITY_KEY])
    if want != have:
        raise BundleError(
            f"{entry.file} was built for compute capability {want} "
            f"({built.gpu_name or 'unknown GPU'}) "
            f"and this GPU ({gpu.get(GPU_NAME_KEY, 'unknown')}) is {have}: rebuild the bundle on this GPU "
            "with `stdrc-export build-engines --backend tensorrt`"
        )


def profile_index(bucket_profiles: tuple[Ranges, ...], shapes: dict[str, tuple[int, ...]]) -> int:
    """The optimization profile (a bucket's) that admits `shapes`; 0 for a single-profile plan."""
    for i, profile in enumerate(bucket_profiles):
        if all(all(lo <= d <= hi for d, lo, hi in zip(shapes[n], *span[::2])) for n, span in profile.items()
               if n in shapes):
            return i
    if bucket_profiles:
        raise BundleError(f"input shapes {dict(shapes)} fit none of the plan's {len(bucket_profiles)} bucket "
                          "profiles: pass one of the bundle's bucket sizes")
    return 0


WEIGHTLESS_FLAG = "STRIP_PLAN"  # a plan built without its weights: refit at load from the ONNX beside it


def refit_onnx(plan: Path, entry: ComponentEntry) -> Path:
    """The ONNX a weight-stripped plan takes its weights from: `<plan stem>.onnx`, one of the entry's files."""
    onnx = plan.with_suffix(".onnx")
    if onnx.name not in entry.extra_files:
        raise BundleError(f"{plan.name} is built without its weights and its entry lists no {onnx.name} to refit "
                          "it from: rebuild the bundle")
    return onnx


def refit_from_onnx(trt: ModuleType, engine: Any, onnx: Path, logger: Any) -> None:
    """Fill a weight-stripped engine's weights from `onnx` (TensorRT 10's ONNX parser refitter); its external
    data (a two-stage bundle's shared `dit.onnx.data`) is read from the ONNX's folder. The parser refitter owns the
    weights it read (TensorRT reads them until refit_cuda_engine returns), so it is kept alive until then."""
    refitter = trt.Refitter(engine, logger)
    parser = trt.OnnxParserRefitter(refitter, logger)
    if not parser.refit_from_file(str(onnx)):
        raise BundleError(f"TensorRT could not read the weights of {onnx.name} for its plan (see its log above): "
                          "rebuild the bundle")
    if not refitter.refit_cuda_engine():
        raise BundleError(f"TensorRT could not refit the plan of {onnx.name} (see its log above): rebuild the bundle")
    del parser  # only now may its weights go


class TensorRTEngine:
    """One deserialized plan with its execution context, stream and device buffers."""

    def __init__(self, path: str | Path, entry: ComponentEntry):
        trt = import_tensorrt()
        self._cudart = cudart = import_cudart()
        check_build(entry, trt.__version__, gpu_facts())
        self.entry = entry
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if self.engine is None:
            raise BundleError(f"TensorRT could not deserialize {path} (see its log above): "
                              "rebuild the bundle")
        if WEIGHTLESS_FLAG in (entry.build.builder_flags or ()):
            refit_from_onnx(trt, self.engine, refit_onnx(Path(path), entry), self._logger)
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self._inputs = [n for n in names if is_input[n]]
        self._outputs = [t.name for t in entry.outputs]
        want = {t.name for t in entry.inputs} | set(self._outputs)
        if set(names) != want:
            raise BundleError(f"{path} has tensors {sorted(names)}, the manifest says {sorted(want)}: "
                              "rebuild the bundle")
        self._dtypes = {n: numpy_dtype(self.engine.get_tensor_dtype(n).name) for n in names}
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, capacity in bytes)
        self._out_shapes: dict[str, tuple[int, ...]] = {}
        self._shapes_key: tuple | None = None
        self._profile = 0
        self._kept: dict[str, np.ndarray] = {}  # kept inputs already on the device (the same array object)
        self.stream = _ok(cudart.cudaStreamCreate())

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, capacity = self._buffers.get(name, (0, 0))
        if nbytes > capacity:
            if ptr:
                _ok(self._cudart.cudaFree(ptr))
            ptr, capacity = _ok(self._cudart.cudaMalloc(max(nbytes, 1))), max(nbytes, 1)
            self._buffers[name] = (ptr, capacity)
        self.context.set_tensor_address(name, ptr)
        return ptr

    def _bind(self, host: dict[str, np.ndarray]) -> None:
        key = tuple(host[n].shape for n in self._inputs)
        if key == self._shapes_key:
            return
        shapes = {n: host[n].shape for n in self._inputs}
        index = profile_index(self.entry.build.bucket_profiles or (), shapes)
        if index != self._profile:  # a plan with a profile per bucket: the one of these shapes
            if not self.context.set_optimization_profile_async(index, int(self.stream)):
                raise BundleError(f"{self.entry.file}: TensorRT refused optimization profile {index}")
            self._profile = index
        for n in self._inputs:
            if not self.context.set_input_shape(n, host[n].shape):
                raise BundleError(f"{self.entry.file}: shape {host[n].shape} for {n!r} is outside "
                                  "the plan's profile")
            self._buffer(n, host[n].nbytes)
        for n in self._outputs:
            shape = tuple(self.context.get_tensor_shape(n))
            self._out_shapes[n] = shape
            self._buffer(n, int(np.prod(shape)) * self._dtypes[n].itemsize)
        self._shapes_key = key

    def _execute(self) -> None:
        if not self.context.execute_async_v3(int(self.stream)):
            raise BundleError(f"TensorRT execution of {self.entry.file} failed (see its log above)")

    def run(self, feeds: dict[str, np.ndarray], keep: Collection[str] = ()) -> dict[str, np.ndarray]:
        """Copy in, execute on the engine's stream, copy out, synchronize. Outputs belong to the caller.

        `keep`: inputs handed over as the same unchanged array at every call (context, masks, a bucket's
        RoPE tables): copied to the device once while the same object and shapes come back."""
        check_feeds(self.entry, feeds, self.entry.file)
        cudart = self._cudart
        host = {n: np.ascontiguousarray(feeds[n], dtype=self._dtypes[n]) for n in self._inputs}
        before = self._shapes_key
        self._bind(host)
        if self._shapes_key != before:
            self._kept.clear()
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for n, arr in host.items():
            if n in keep and self._kept.get(n) is feeds[n]:
                continue  # bound once: still on the device
            if n in keep:
                self._kept[n] = feeds[n]
            _ok(cudart.cudaMemcpyAsync(self._buffers[n][0], arr.ctypes.data, arr.nbytes, h2d, self.stream))
        self._execute()
        out = {n: np.empty(self._out_shapes[n], self._dtypes[n]) for n in self._outputs}
        for n, arr in out.items():
            _ok(cudart.cudaMemcpyAsync(arr.ctypes.data, self._buffers[n][0], arr.nbytes, d2h, self.stream))
        _ok(cudart.cudaStreamSynchronize(self.stream))  # `host` stays alive until here
        return {n: to_float32(arr) for n, arr in out.items()}

    def close(self) -> None:
        """Free the device buffers and stream; the engine is unusable afterwards."""
        for ptr, _ in self._buffers.values():
            _ok(self._cudart.cudaFree(ptr))
        self._buffers.clear()
        self._shapes_key = None
        if self.stream is not None:
            _ok(self._cudart.cudaStreamDestroy(self.stream))
            self.stream = None

    def __enter__(self) -> TensorRTEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
