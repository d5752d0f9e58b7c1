"""Engine backends behind one interface: `run(feeds) -> outputs`, numpy in and out.

`onnxruntime` (CPU, CUDA EP) needs no torch; `torch` and `aoti` import torch lazily;
`tensorrt` is a thin layer over TensorRT and cuda-python, untested in CI.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Protocol

import numpy as np

from stdrc.runtime.errors import BackendUnavailableError, BundleError, InputError
from stdrc.runtime.manifest import ComponentEntry, bundle_path
from stdrc.runtime.vocab import CODE_BACKENDS, CUDA_GRAPH_BACKENDS, DEVICES, TORCH_BACKENDS

log = logging.getLogger(__name__)


class Engine(Protocol):
    """Outputs are fresh numpy arrays owned by the caller.

    `keep` names inputs the caller passes as the same, unchanged array object call after call; an
    engine may keep those on the device instead of copying them in again (ONNX Runtime does)."""

    entry: ComponentEntry

    def run(self, feeds: dict[str, np.ndarray], keep: Collection[str] = ()) -> dict[str, np.ndarray]: ...


def check_feeds(entry: ComponentEntry, feeds: dict[str, np.ndarray], component: str) -> None:
    """Refuse feeds whose names, ranks, static dims or dynamic-dim ranges differ from the manifest."""
    ranges = entry.dynamic_dims
    for spec in entry.inputs:
        if spec.name not in feeds:
            raise BundleError(f"{component}: input {spec.name!r} is missing")
        shape = feeds[spec.name].shape
        ok = len(shape) == len(spec.shape) and all(
            (isinstance(want, int) and got == want)
            or (isinstance(want, str) and want in ranges and ranges[want][0] <= got <= ranges[want][2])
            for got, want in zip(shape, spec.shape)
        )
        if not ok:
            named = ", ".join(f"{d} in {ranges[d][0]}..{ranges[d][2]}"
                              for d in spec.shape if isinstance(d, str) and d in ranges)
            raise BundleError(
                f"{component}: input {spec.name!r} has shape {tuple(shape)}, the engine takes {list(spec.shape)}"
                f"{f' with {named}' if named else ''}"
            )


def available(backend: str) -> bool:
    module = {"onnxruntime": "onnxruntime", "torch": "torch", "aoti": "torch", "tensorrt": "tensorrt"}[backend]
    return importlib.util.find_spec(module) is not None


def cuda_usable(backend: str) -> tuple[bool, str]:
    """Whether `backend` can run on CUDA here, and the fact that decided it (for the log line)."""
    if backend == "onnxruntime":
        import onnxruntime as ort

        ok = "CUDAExecutionProvider" in ort.get_available_providers()
        return ok, f"onnxruntime {'has' if ok else 'has no'} CUDAExecutionProvider"
    if backend in TORCH_BACKENDS:
        import torch

        ok = torch.cuda.is_available()
        return ok, f"torch.cuda.is_available() is {ok}"
    if backend == "tensorrt":
        return True, "TensorRT engines run on CUDA only"
    raise BundleError(f"unknown backend {backend!r}: rebuild the bundle")


def resolve_device(device: str, backends: Iterable[str]) -> str:
    """'auto' -> 'cuda' when every backend in use can run there, else 'cpu' (said in one log line)."""
    if device not in DEVICES:
        raise InputError(f"device {device!r} is not one of {', '.join(DEVICES)}: use --device auto, cpu or cuda")
    if device != "auto":
        return device
    facts = {b: cuda_usable(b) for b in sorted(set(backends)) if available(b)}
    chosen = "cuda" if facts and all(ok for ok, _ in facts.values()) else "cpu"
    log.info("device auto -> %s (%s)", chosen, "; ".join(why for _, why in facts.values()) or "no backend")
    return chosen


def check_cuda_graph(entry: ComponentEntry) -> None:
    """CUDA graphs are implemented for torch/aoti engines only: refuse them elsewhere rather than ignore them."""
    if entry.backend not in CUDA_GRAPH_BACKENDS:
        raise InputError(f"--cuda-graphs needs a torch or aoti bundle, this one is {entry.backend}: drop --cuda-graphs "
                         "or rebuild with --backend aoti")


def check_trust(name: str, entry: ComponentEntry, trust_code: bool) -> None:
    """torch/aoti engines run code when loaded (unpickling, a shared library): only on the caller's word."""
    if entry.backend in CODE_BACKENDS and not trust_code:
        raise BundleError(
            f"bundle component {name} is a {entry.backend} engine, and loading one runs code from the bundle "
            "(pickle or a shared library; a sha256 cannot make that safe): open it only if you trust who built "
            "it, with --trust-bundle-code (trust_code=True), or use an onnxruntime/tensorrt bundle"
        )


def open_engine(bundle_dir: Path, name: str, entry: ComponentEntry, device: str = "cpu",
                cuda_graph: bool = False, trust_code: bool = False) -> Engine:
    """`cuda_graph` (replay captured CUDA graphs) exists for torch/aoti engines on CUDA only; others refuse it.

    `trust_code` must be True for torch/aoti engines (see `check_trust`).
    """
    check_trust(name, entry, trust_code)
    if cuda_graph:
        check_cuda_graph(entry)
    if not available(entry.backend):
        raise BackendUnavailableError(
            f"bundle component {name} needs the {entry.backend} backend, which is not installed here: "
            f"install it or rebuild the bundle with --backend onnxruntime"
        )
    path = bundle_path(bundle_dir, entry.file)
    if entry.backend == "onnxruntime":
        from stdrc.runtime.backends.onnxruntime import OrtEngine

        return OrtEngine(path, entry, device=device)
    if entry.backend in TORCH_BACKENDS:
        from stdrc.runtime.backends.torch import TorchEngine

        return TorchEngine.from_file(path, entry, device=device, cuda_graph=cuda_graph)
    if entry.backend == "tensorrt":
        from stdrc.runtime.backends.tensorrt import TensorRTEngine

        return TensorRTEngine(path, entry)
    raise BundleError(f"unknown backend {entry.backend!r} for {name}: rebuild the bundle")
