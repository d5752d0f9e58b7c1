"""PyTorch engines: exported programs (`torch` backend), AOTInductor packages (`aoti`), or live modules.

torch is imported here only, so the ONNX Runtime path never loads it.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from pathlib import Path

import numpy as np
import torch

from stdrc.runtime.errors import BackendUnavailableError, BundleError, InputError
from stdrc.runtime.manifest import ComponentEntry

log = logging.getLogger(__name__)


class TorchEngine:
    def __init__(self, module: torch.nn.Module | object, entry: ComponentEntry, device: str = "cpu"):
        self.entry = entry
        self.module = module
        self.device = torch.device(device)
        self._outputs = [t.name for t in entry.outputs]

    @staticmethod
    def from_file(path: Path, entry: ComponentEntry, device: str = "cpu", cuda_graph: bool = False) -> TorchEngine:
        """`cuda_graph`: replay one captured forward per input shape (CUDA only; not run yet, see CudaGraphStep)."""
        check_build_device(path, entry, device)
        try:
            if entry.backend == "aoti":
                module = torch._inductor.aoti_load_package(str(path))
            else:
                module = torch.export.load(str(path)).module()
                module.to(device)
        except Exception as e:
            reason = str(e).splitlines()[0]
            raise BundleError(f"{path} could not be loaded by torch ({reason}): rebuild the bundle") from e
        return TorchEngine(CudaGraphStep(module) if cuda_graph else module, entry, device)

    @torch.inference_mode()
    def run(self, feeds: dict[str, np.ndarray], keep: Collection[str] = ()) -> dict[str, np.ndarray]:
        """`keep` (inputs unchanged across calls) is accepted for the Engine interface; not used here."""
        args = [torch.from_numpy(np.ascontiguousarray(feeds[t.name])).to(self.device) for t in self.entry.inputs]
        out = self.module(*args)
        out = out if isinstance(out, (tuple, list)) else (out,)
        return {name: value.detach().float().cpu().numpy() if value.is_floating_point() else value.cpu().numpy()
                for name, value in zip(self._outputs, out)}


def check_build_device(path: Path, entry: ComponentEntry, device: str) -> None:
    """Exported programs bake their build device in (constants, tensor-metadata asserts): refuse any other."""
    built, want = entry.build.device, torch.device(device).type
    if built is None or torch.device(built).type != want:
        raise BundleError(
            f"{path.name} was exported for {built or 'an unrecorded device'}, not {want}: rebuild the bundle on a "
            f"{want} machine (stdrc-export build-engines --backend {entry.backend})"
            + (f" or run it with --device {torch.device(built).type}" if built else ""))


class CudaGraphStep:
    """Replays one captured forward per input signature (shapes, dtypes): launch overhead removed.

    Not run yet: written in a session without a GPU. Capture follows PyTorch's recipe: copy
    the inputs into static buffers, warm up on a side stream, capture, then replay after
    copying new inputs in. The returned tensor is the graph's own output buffer: it is
    overwritten by the next call with the same shapes, so copy it out before that.
    """

    def __init__(self, module: torch.nn.Module, warmup: int = 2):
        if not torch.cuda.is_available():
            raise BackendUnavailableError("CUDA graphs need a CUDA device: drop --cuda-graphs (cuda_graph) on CPU")
        self.module = module
        self.warmup = warmup
        # input signature -> (static inputs, graph, static output)
        self.graphs: dict[tuple, tuple[list[torch.Tensor], object, torch.Tensor]] = {}

    @torch.no_grad()
    def _capture(self, args: tuple[torch.Tensor, ...]) -> tuple[list[torch.Tensor], object, torch.Tensor]:
        if any(a.device.type != "cuda" for a in args):
            raise InputError("CudaGraphStep inputs must already be on the GPU: move them with .cuda() first")
        with torch.inference_mode(False):  # ordinary tensors: later copies in work in any mode
            static = [a.detach().clone() for a in args]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):  # lazy init, cuBLAS / SDPA autotuning, torch.compile
                self.module(*static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            out = self.module(*static)
        log.info("captured a CUDA graph for input shapes %s", [tuple(a.shape) for a in args])
        return static, graph, out

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        key = tuple((tuple(a.shape), a.dtype, a.device) for a in args)
        if key not in self.graphs:
            self.graphs[key] = self._capture(args)
        static, graph, out = self.graphs[key]
        for dst, src in zip(static, args):
            if dst.data_ptr() != src.data_ptr():
                dst.copy_(src)
        graph.replay()
        return out
