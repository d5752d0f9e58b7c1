"""PyTorch engines: exported programs (`torch` backend), AOTInductor packages (`aoti`), or live modules.

torch is imported here only, so the ONNX Runtime path never loads it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from stdrc.runtime.errors import BundleError
from stdrc.runtime.manifest import ComponentEntry


class TorchEngine:
    def __init__(self, module: torch.nn.Module | object, entry: ComponentEntry, device: str = "cpu"):
        self.entry = entry
        self.module = module
        self.device = torch.device(device)
        self._outputs = [t.name for t in entry.outputs]

    @staticmethod
    def from_file(path: Path, entry: ComponentEntry, device: str = "cpu") -> TorchEngine:
        try:
            if entry.backend == "aoti":
                module = torch._inductor.aoti_load_package(str(path))
            else:
                module = torch.export.load(str(path)).module()
                module.to(device)
        except Exception as e:
            raise BundleError(f"{path} could not be loaded by torch ({str(e).splitlines()[0]}): rebuild the bundle") from e
        return TorchEngine(module, entry, device)

    @torch.inference_mode()
    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        args = [torch.from_numpy(np.ascontiguousarray(feeds[t.name])).to(self.device) for t in self.entry.inputs]
        out = self.module(*args)
        out = out if isinstance(out, (tuple, list)) else (out,)
        return {name: value.detach().float().cpu().numpy() if value.is_floating_point() else value.cpu().numpy()
                for name, value in zip(self._outputs, out)}
