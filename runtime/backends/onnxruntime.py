"""ONNX Runtime engines: CPU everywhere, the CUDA EP where onnxruntime-gpu and a GPU are present."""

from __future__ import annotations

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
        # the bundle holds an offline-optimised graph; do not redo the work at every load
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers_for(device))
        except BackendUnavailableError:
            raise
        except Exception as e:
            raise BundleError(f"{path} could not be loaded by ONNX Runtime ({str(e).splitlines()[0]}): rebuild the bundle") from e
        self._outputs = [t.name for t in entry.outputs]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self.session.run(self._outputs, {t.name: feeds[t.name] for t in self.entry.inputs})
        return dict(zip(self._outputs, values))
