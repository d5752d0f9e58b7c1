"""ONNX Runtime engines: CPU everywhere, the CUDA EP where onnxruntime-gpu and a GPU are present."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

import numpy as np
import onnxruntime as ort

from stdrc.runtime.errors import BackendUnavailableError, BundleError
from stdrc.runtime.manifest import ComponentEntry


def providers_for(device: str) -> list[str]:
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise BackendUnavailableError(
            "device=cuda needs onnxruntime-gpu (pip install 'stdrc[gpu]'); this onnxruntime has "
            f"{', '.join(ort.get_available_providers())}"
        )
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


class OrtEngine:
    def __init__(self, path: Path, entry: ComponentEntry, device: str = "cpu", threads: int = 0):
        self.entry = entry
        options = ort.SessionOptions()
        # an offline-optimised graph (fp32 CPU builds) is not optimised again at every load; a graph left for
        # the target provider (fp16 for the CUDA EP) gets ORT's full set at load
        offline = entry.build.graph_optimization_level == "extended"
        options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_BASIC if offline
                                            else ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        options.intra_op_num_threads = threads
        # no memory pattern: with it every run after the first allocates the first run's planned block beside
        # what the arena already holds (measured +154 MB on the reduced-depth DiT, +290 MB on its text
        # encoder, same outputs, DiT step no slower on CPU; docs/benchmarks.md, memory plans)
        options.enable_mem_pattern = False
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers_for(device))
        except BackendUnavailableError:
            raise
        except Exception as e:
            reason = str(e).splitlines()[0]
            raise BundleError(f"{path} could not be loaded by ONNX Runtime ({reason}): rebuild the bundle") from e
        self._outputs = [t.name for t in entry.outputs]
        self._device = "cuda" if device == "cuda" else "cpu"
        self._kept: dict[str, tuple[np.ndarray, ort.OrtValue]] = {}

    def run(self, feeds: dict[str, np.ndarray], keep: Collection[str] = ()) -> dict[str, np.ndarray]:
        """`keep`: inputs the caller hands over as the same unchanged array at every call (the DiT's
        context and masks within one generation). They are placed on the device once and stay bound
        (IO binding) while the same array object comes back; a new object is placed anew."""
        if not keep:
            values = self.session.run(self._outputs, {t.name: feeds[t.name] for t in self.entry.inputs})
            return dict(zip(self._outputs, values))
        binding = self.session.io_binding()
        for t in self.entry.inputs:
            value = feeds[t.name]
            if t.name not in keep:
                binding.bind_cpu_input(t.name, value)
                continue
            held = self._kept.get(t.name)
            if held is None or held[0] is not value:
                held = (value, ort.OrtValue.ortvalue_from_numpy(value, self._device, 0))
                self._kept[t.name] = held
            binding.bind_ortvalue_input(t.name, held[1])
        for name in self._outputs:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        return dict(zip(self._outputs, binding.copy_outputs_to_cpu()))
