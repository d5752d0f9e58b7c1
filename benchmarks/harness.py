"""Shared benchmark plumbing: timing, memory, versions, device facts. No model code here.

Timing: warm-up calls first, then `repeats` timed calls; each is bracketed by a device
synchronisation (a no-op on CPU), and min and median are reported. Memory on CPU is the
process RSS high-water mark (`VmHWM`), reset through `/proc/self/clear_refs` so that each
measured section gets its own peak; on GPU it is torch's allocator peak or, for engines
torch does not allocate for (ONNX Runtime CUDA EP, TensorRT), the device memory in use.
"""

from __future__ import annotations

import datetime
import gc
import importlib
import importlib.metadata
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

# Dense (no sparsity) peak TFLOP/s by GPU name fragment, most specific first: NVIDIA datasheets
# (their tensor-core figures are quoted with sparsity: halved here). fp32 = CUDA cores;
# tf32 / bf16 / fp8 = tensor cores. Unknown devices (and every CPU) get no peak.
GPU_PEAK_TFLOPS = (
    ("H100 PCIe", {"fp32": 51.2, "tf32": 378.0, "bf16": 756.0, "fp8": 1513.0}),
    ("H100 NVL", {"fp32": 60.0, "tf32": 417.5, "bf16": 835.0, "fp8": 1670.5}),
    ("H100", {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4, "fp8": 1978.9}),  # SXM5 (HBM3)
    ("H200", {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4, "fp8": 1978.9}),
    ("A100", {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0}),
)


@dataclass(frozen=True)
class Timing:
    """Milliseconds of each timed repeat (warm-up excluded)."""

    times_ms: tuple[float, ...]

    @property
    def min_ms(self) -> float:
        return min(self.times_ms)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    def to_json(self) -> dict:
        return {"min": round(self.min_ms, 4), "median": round(self.median_ms, 4),
                "all": [round(t, 4) for t in self.times_ms]}


def add_device_flag(parser) -> None:
    """`--device`, defaulting to auto as every stdrc CLI does (resolve_device below)."""
    from stdrc.runtime.vocab import DEVICES

    parser.add_argument("--device", default="auto", choices=DEVICES,
                        help="default auto: CUDA when every backend measured can run there, else CPU (the report "
                             "records the device used)")


def resolve_device(device: str, backends: Iterable[str]) -> str:
    """`--device` resolved as the CLIs resolve it (stdrc.runtime.backends.resolve_device over `backends`)."""
    from stdrc.runtime.backends import resolve_device as resolve

    return resolve(device, backends)


def bundle_backends(bundle: Path) -> set[str]:
    """The backends of a bundle's engines, from its manifest."""
    from stdrc.runtime.manifest import read_manifest

    return {entry.backend for entry in read_manifest(bundle).components.values()}


def cuda_sync(device: str) -> Callable[[], None]:
    """A device-wide synchronise (all streams, so ONNX Runtime's and TensorRT's too), or a no-op."""
    if device != "cuda":
        return lambda: None
    import torch

    return torch.cuda.synchronize


def time_calls(call: Callable[[], object], warmup: int, repeats: int, sync: Callable[[], None]) -> Timing:
    for _ in range(warmup):
        call()
    sync()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        call()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return Timing(tuple(times))


# -- memory -----------------------------------------------------------------------------------

def _status_kb(field: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    found = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(found.group(1)) if found else None


def rss_mb() -> float | None:
    """Current resident set size of this process (Linux), in MiB."""
    kb = _status_kb("VmRSS")
    return None if kb is None else kb / 1024


def reset_peak_rss() -> bool:
    """Reset the RSS high-water mark (Linux >= 4.0); False where that is not possible."""
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float | None:
    """RSS high-water mark since the last reset (or process start), in MiB."""
    kb = _status_kb("VmHWM")
    if kb is None:
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux
    return kb / 1024


def write_warm_model(path: Path) -> Path:
    """A one-node ONNX graph (Relu on 4 floats) for `warm_onnxruntime`; written by the parent, so the
    measured child never imports onnx."""
    from onnx import TensorProto, helper, save

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "warm", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    save(model, str(path))
    return path


def warm_onnxruntime(model: str | Path, device: str = "cpu") -> None:
    """Import ONNX Runtime and run one session of `model` (write_warm_model's), so that its library code
    and globals are resident before a measurement's baseline: what is added then is the engines' own."""
    import numpy as np
    import onnxruntime as ort

    from stdrc.runtime.backends.onnxruntime import providers_for

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(model), options, providers=providers_for(device))
    session.run(None, {"x": np.ones((1, 4), np.float32)})


def gpu_used_mb() -> float | None:
    """Device memory in use by every process and allocator (cudaMemGetInfo), in MiB."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    return (total - free) / 2**20


# -- facts ------------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device: str) -> dict:
    """What ran the benchmark, with its peak TFLOP/s where known (never for CPUs)."""
    if device == "cuda":
        import torch

        name = torch.cuda.get_device_name()
        major, minor = torch.cuda.get_device_capability()
        peak = next((p for key, p in GPU_PEAK_TFLOPS if key in name), None)
        return {"kind": "cuda", "name": name, "compute_capability": f"{major}.{minor}",
                "memory_gb": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
                "peak_tflops": peak}
    return {"kind": "cpu", "name": cpu_model(), "cores": os.cpu_count(), "peak_tflops": None}


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def tensorrt_status() -> dict:
    """Whether TensorRT imports here, and its version: reported even when it is not used."""
    try:
        trt = importlib.import_module("tensorrt")
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else ""
        return {"importable": False, "reason": f"{type(e).__name__}: {first}"}
    return {"importable": True, "version": getattr(trt, "__version__", None)}


def versions() -> dict:
    out = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "stdrc": _version("stdrc"),
        "numpy": _version("numpy"),
        "onnxruntime": _version("onnxruntime") or _version("onnxruntime-gpu"),
        "onnx": _version("onnx"),
        "torch": _version("torch"),
        "ltx-core": _version("ltx-core"),
        "tensorrt": tensorrt_status(),
    }
    try:
        import onnxruntime

        out["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except ImportError:
        pass
    if "torch" in sys.modules:  # only report CUDA facts when torch is already loaded
        torch = sys.modules["torch"]
        out["torch_cuda"] = torch.version.cuda
        out["torch_threads"] = torch.get_num_threads()
    return out


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages: on a shared machine, how busy it was around a run."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def timestamp() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def dump_json(report: dict) -> str:
    return json.dumps(report, indent=2, sort_keys=False)


def fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)
