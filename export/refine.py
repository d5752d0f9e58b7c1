"""The refinement DiT of two-stage generation: the DiT with the distilled LoRA as low-rank branches.

Stage 2 runs the base DiT with LTX's distilled LoRA (`--refine-lora FILE[:STRENGTH]`). ltx-core fuses
it into the weights (`loader/fuse_loras.py`: W + (B * strength) @ A); here each target Linear keeps
its own `weight` and `bias` under their names and adds a branch, y = W x + b + B (strength * A x),
so an exported refinement graph holds the base weights as the `dit` graph does (the engine points at
the `dit` component's weights file, engines/refine.py) and the LoRA's A/B beside them.

The file is checked against the DiT's shapes from its header (export/lora.py) before any weight is
read: a LoRA for another model (keys or shapes this DiT lacks) is one LoraError.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from stdrc.export.config import DiTConfig
from stdrc.export.dit import STDRCTransformer
from stdrc.export.errors import LoraError
from stdrc.export.lora import LoraFile, LoraSet, LoraSpec, dit_shapes

LORA_A, LORA_B = "lora_A", "lora_B"  # the branch buffers' names beside each target's weight and bias
RANDOM_RANK = 4  # the tiny presets' random refinement LoRA (`--two-stage`)
COMFY_PREFIX = "diffusion_model."  # the key layout of Lightricks' LoRA files
MODULE_PREFIX = "ltx."  # where `add_lora_branches` puts the branches in an STDRCTransformer (its `ltx` module)


class LoraLinear(torch.nn.Module):
    """A Linear with a low-rank branch: its `weight`/`bias` are the base Linear's own (same names, same tensors)."""

    def __init__(self, linear: torch.nn.Linear, down: torch.Tensor, up: torch.Tensor, strength: float):
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias
        self.register_buffer(LORA_A, down.to(linear.weight.dtype).contiguous())  # [rank, in]
        self.register_buffer(LORA_B, up.to(linear.weight.dtype).contiguous())  # [out, rank]
        self.strength = float(strength)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the strength scales the rank-wide product: the cheapest place, the same value as ltx-core's B * strength
        low = torch.nn.functional.linear(x, self.lora_A) * self.strength
        return torch.nn.functional.linear(x, self.weight, self.bias) + torch.nn.functional.linear(low, self.lora_B)


def load_refine_lora(spec: LoraSpec, cfg: DiTConfig) -> LoraFile:
    """The refinement LoRA checked against `cfg`'s DiT from its header alone (no weight of it or the DiT read)."""
    return LoraSet.load([spec], dit_shapes(cfg)).files[0]


def add_lora_branches(dit: STDRCTransformer, lora: LoraFile) -> STDRCTransformer:
    """`dit` (in place) with a `LoraLinear` on each of `lora`'s targets; the base weights are not changed."""
    modules = dict(dit.ltx.named_modules())
    with safe_open(str(lora.path), framework="pt") as f:
        for key, pair in sorted(lora.pairs.items()):
            path = key[: -len(".weight")]
            linear = modules.get(path)
            if not isinstance(linear, torch.nn.Linear):
                raise LoraError(f"LoRA {lora.path.name} targets {key}, which is not a Linear weight: a refinement "
                                "LoRA adapts Linear layers only; pass LTX's distilled LoRA")
            parent_path, _, name = path.rpartition(".")
            parent = modules[parent_path] if parent_path else dit.ltx
            down, up = f.get_tensor(pair.down).float(), f.get_tensor(pair.up).float()
            setattr(parent, name, LoraLinear(linear, down, up, lora.strength))
    return dit


def branch_constants(lora: LoraFile) -> dict[str, torch.Tensor]:
    """The branches' A and B as `add_lora_branches` names them in the DiT (`ltx.<module>.lora_A`/`lora_B`), in the
    file's own dtype: an aoti refinement package is compiled without constants and gets these at load."""
    out = {}
    with safe_open(str(lora.path), framework="pt") as f:
        for key, pair in sorted(lora.pairs.items()):
            module = MODULE_PREFIX + key[: -len(".weight")]
            out[f"{module}.{LORA_A}"] = f.get_tensor(pair.down).contiguous()
            out[f"{module}.{LORA_B}"] = f.get_tensor(pair.up).contiguous()
    return out


def lora_targets(cfg: DiTConfig) -> tuple[str, ...]:
    """Every Linear weight of the DiT (meta device): the keys a distilled (whole-model) LoRA adapts."""
    from stdrc.export.dit import build_ltx_model

    with torch.device("meta"):
        model = build_ltx_model(cfg)
    return tuple(f"{name}.weight" for name, m in model.named_modules() if isinstance(m, torch.nn.Linear))


def write_random_lora(path: str | Path, cfg: DiTConfig, rank: int = RANDOM_RANK, seed: int = 0,
                      scale: float = 0.1, dtype: torch.dtype = torch.bfloat16) -> Path:
    """A seeded rank-`rank` LoRA over every Linear of `cfg`'s DiT, in Lightricks' layout and dtype (bf16,
    `diffusion_model.<ltx key>.lora_A/B.weight`): the tiny presets' stand-in for the distilled LoRA.

    Which Linears the real distilled LoRA adapts is not documented; it is taken as all of them (a LoRA
    extracted from a distilled model), so a family's own layers (LTX-2's caption projection, LTX-2.3's
    gates and prompt AdaLN) make it refuse a DiT of the other family. The values are bf16 whatever `dtype`
    stores them in (ltx-core multiplies a bf16 file's factors in bf16: fp32 storage isolates the arithmetic)."""
    shapes = dit_shapes(cfg)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for key in lora_targets(cfg):
        rows, cols = shapes[key]
        module = COMFY_PREFIX + key[: -len(".weight")]
        for name, shape in (("lora_A", (rank, cols)), ("lora_B", (rows, rank))):
            value = torch.randn(shape, generator=gen) * scale
            tensors[f"{module}.{name}.weight"] = value.to(torch.bfloat16).to(dtype)
    path = Path(path)
    save_file(tensors, str(path), metadata={"stdrc": "random refinement LoRA"})
    return path
