"""PyTorch engines: exported programs (`torch` backend), AOTInductor packages (`aoti`), or live modules.

torch is imported here only, so the ONNX Runtime path never loads it.
"""

from __future__ import annotations

import logging
import os
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
                if entry.build.constants_from is not None:
                    module = SharedConstants(module, path.parent, entry, device)
            else:
                module = torch.export.load(str(path)).module()
                module.to(device)
        except BundleError:
            raise
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


PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class SharedConstants:
    """An aoti package compiled without constants (`dit_refine`, engines/aoti.py), given them at load: the
    `constants_from` package's (read through its own runner: torch's Python package loader has no
    `extract_constants_map`) and `constants_file`'s, user-managed (pointers, no copy). Holding this keeps them alive.

    The base package is mapped here a second time, as ONNX Runtime maps a shared weights file once per session;
    the C++ runner hands over the loaded `dit` engine's own constants instead."""

    def __init__(self, package, folder: Path, entry: ComponentEntry, device: str):
        from safetensors.torch import load_file

        from stdrc.runtime.manifest import bundle_path

        self.package = package
        self.base = package_runner(bundle_path(folder, entry.build.constants_from), device)
        base = self.base.extract_constants_map(False)
        dtype = PRECISION_DTYPES[entry.precision]
        self.own = {k: v.to(device=device, dtype=dtype).contiguous()
                    for k, v in load_file(str(bundle_path(folder, entry.build.constants_file))).items()}
        wanted = set(package.get_constant_fqns())
        missing, clash = wanted - set(base) - set(self.own), set(base) & set(self.own)
        if missing or clash:
            name = sorted(missing or clash)[0]
            raise BundleError(f"{entry.file}: constant {name} is {'in neither' if missing else 'in both'} "
                              f"{entry.build.constants_from} and {entry.build.constants_file}: rebuild the bundle")
        package.load_constants({**{k: base[k] for k in wanted & set(base)}, **self.own}, check_full_update=True,
                               user_managed=True)

    def __call__(self, *args: torch.Tensor):
        return self.package(*args)


def package_runner(path: Path, device: str):
    """The model runner of an aoti package (its shared library unpacked to a temporary folder, removed once
    loaded), for the constants it holds."""
    import tempfile
    import zipfile

    with zipfile.ZipFile(path) as archive, tempfile.TemporaryDirectory(prefix="stdrc-aoti-") as tmp:
        names = [n for n in archive.namelist() if "/data/aotinductor/model/" in n]
        libraries = [n for n in names if n.endswith(".so")]
        if len(libraries) != 1:
            raise BundleError(f"{path.name} holds {len(libraries)} model libraries, not one: rebuild the bundle")
        archive.extractall(tmp, names)
        library = os.path.join(tmp, libraries[0])
        if torch.device(device).type == "cuda":
            return torch._C._aoti.AOTIModelContainerRunnerCuda(library, 1, str(torch.device(device)),
                                                               os.path.dirname(library))
        return torch._C._aoti.AOTIModelContainerRunnerCpu(library, 1)


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
