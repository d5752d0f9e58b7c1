"""Engine backends behind one interface: `run(feeds) -> outputs`, numpy in and out.

`onnxruntime` (CPU, CUDA EP) needs no torch; `torch` and `aoti` import torch lazily;
`tensorrt` is a thin layer over TensorRT and cuda-python, untested in CI.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Collection
from pathlib import Path
from typing import Protocol

import numpy as np

from stdrc.runtime.errors import BackendUnavailableError, BundleError
from stdrc.runtime.manifest import ComponentEntry

BACKENDS = ("onnxruntime", "torch", "aoti", "tensorrt")


class Engine(Protocol):
    """Outputs are fresh numpy arrays owned by the caller.

    `keep` names inputs the caller passes as the same, unchanged array object call after call; an
    engine may keep those on the device instead of copying them in again (ONNX Runtime does)."""

    entry: ComponentEntry

    def run(self, feeds: dict[str, np.ndarray], keep: Collection[str] = ()) -> dict[str, np.ndarray]: ...


def check_feeds(entry: ComponentEntry, feeds: dict[str, np.ndarray], component: str) -> None:
    """Refuse feeds whose names, ranks or static dims differ from the manifest."""
    batch_range = entry.dynamic_dims.get("batch")
    for spec in entry.inputs:
        if spec.name not in feeds:
            raise BundleError(f"{component}: input {spec.name!r} is missing")
        shape = feeds[spec.name].shape
        ok = len(shape) == len(spec.shape) and all(
            (isinstance(want, int) and got == want)
            or (want == "batch" and batch_range is not None and batch_range[0] <= got <= batch_range[2])
            for got, want in zip(shape, spec.shape)
        )
        if not ok:
            raise BundleError(
                f"{component}: input {spec.name!r} has shape {tuple(shape)}, the engine takes {list(spec.shape)}"
                f"{f' with batch in {batch_range[0]}..{batch_range[2]}' if batch_range else ''}"
            )


def available(backend: str) -> bool:
    module = {"onnxruntime": "onnxruntime", "torch": "torch", "aoti": "torch", "tensorrt": "tensorrt"}[backend]
    return importlib.util.find_spec(module) is not None


def open_engine(bundle_dir: Path, name: str, entry: ComponentEntry, device: str = "cpu",
                cuda_graph: bool = False) -> Engine:
    """`cuda_graph` applies to torch/aoti engines on CUDA (TensorRT engines capture their own)."""
    if not available(entry.backend):
        raise BackendUnavailableError(
            f"bundle component {name} needs the {entry.backend} backend, which is not installed here: "
            f"install it or rebuild the bundle with --backend onnxruntime"
        )
    path = bundle_dir / entry.file
    if entry.backend == "onnxruntime":
        from stdrc.runtime.backends.onnxruntime import OrtEngine

        return OrtEngine(path, entry, device=device)
    if entry.backend in ("torch", "aoti"):
        from stdrc.runtime.backends.torch import TorchEngine

        return TorchEngine.from_file(path, entry, device=device, cuda_graph=cuda_graph)
    if entry.backend == "tensorrt":
        from stdrc.runtime.backends.tensorrt import TensorRTEngine

        return TensorRTEngine(path, entry)
    raise BundleError(f"unknown backend {entry.backend!r} for {name}: rebuild the bundle")
