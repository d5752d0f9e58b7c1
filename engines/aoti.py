"""torch.export programs and AOTInductor packages; the refinement package of a two-stage aoti bundle.

`dit_refine.pt2` is the refinement DiT (export/refine.py: the DiT with the LoRA's low-rank branches) compiled with
`aot_inductor.package_constants_in_so = False` (torch 2.13): its shared library holds the kernels and no weights.
At load the runtime hands it, user-managed (pointers, not copies), the `dit` package's own constants (its runner's
`extract_constants_map`, by FQN: the branches keep each Linear's `weight`/`bias` names) and the branches' A/B from
`dit_refine.lora.safetensors` (the LoRA file's tensors under the refinement's names, in the file's dtype). The DiT's
weights stay in `dit.pt2` alone; the refinement adds a kernel library and the LoRA's bytes. Its entry's build facts
`constants_from` / `constants_file` name both files (runtime/backends/torch.py, runtime/cpp/src/engine.cpp).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from stdrc.export.errors import ExportError
from stdrc.export.lora import LoraFile
from stdrc.export.onnx_export import dynamic_shapes
from stdrc.export.refine import LORA_A, LORA_B, add_lora_branches, branch_constants
from stdrc.export.specs import ComponentSpec
from stdrc.runtime.manifest import ComponentEntry, sha256_file
from stdrc.runtime.schema import BuildFacts

CONSTANTS_SUFFIX = ".lora.safetensors"  # `dit_refine.lora.safetensors`: the refinement package's own constants


def torch_engine(module: torch.nn.Module, spec: ComponentSpec, out: Path, backend: str, device: str,
                 constants_in_package: bool = True) -> None:
    """`module` exported at `spec`'s shapes and saved (`torch`) or compiled by AOTInductor (`aoti`) at `out`.
    `constants_in_package=False` (aoti): a package without its weights, given them at load."""
    args = spec.torch_inputs(device=device)
    with torch.no_grad():
        program = torch.export.export(module.to(device), args, dynamic_shapes=dynamic_shapes(spec))
    tmp = out.with_name(f".{out.stem}.tmp{out.suffix}")  # aoti_compile_and_package wants a .pt2 name
    tmp.unlink(missing_ok=True)
    if backend == "torch":
        torch.export.save(program, str(tmp))
    else:
        with torch._inductor.config.patch({"aot_inductor.package_constants_in_so": constants_in_package}):
            torch._inductor.aoti_compile_and_package(program, package_path=str(tmp))
    os.replace(tmp, out)


def refine_package(dit: torch.nn.Module, lora: LoraFile, spec: ComponentSpec, out: Path, device: str) -> None:
    """`out`: the refinement package of `dit` (the export module, RoPE as inputs) and `lora`, without constants.
    Its branch buffers must be the names `branch_constants` stores (else ExportError: the load would fail)."""
    module = add_lora_branches(dit, lora).eval()
    names = {n for n, _ in module.named_buffers() if n.rsplit(".", 1)[-1] in (LORA_A, LORA_B)}
    if names != set(branch_constants(lora)):
        raise ExportError("the refinement's LoRA buffers are not named as branch_constants names them: report it")
    torch_engine(module, spec, out, "aoti", device, constants_in_package=False)


def write_branch_constants(lora: LoraFile, out: Path) -> Path:
    """The branches' A/B under the refinement's constant names, in the LoRA file's dtype (its bytes, once)."""
    tmp = out.with_name(f".{out.name}.tmp")
    save_file(branch_constants(lora), str(tmp), metadata={"stdrc": f"refinement LoRA {lora.path.name}"})
    tmp.chmod(0o644)  # safetensors writes 0600; the bundle's other files are readable by all
    os.replace(tmp, out)
    return out


def refine_entry(dit: ComponentEntry, package: Path, constants: Path, spec: ComponentSpec,
                 source: dict) -> ComponentEntry:
    """The `dit_refine` entry: its package, the dit package it takes the weights from and its own constants."""
    extra = {dit.file: dit.sha256, constants.name: sha256_file(constants)}
    facts = BuildFacts(torch_version=torch.__version__, device=dit.build.device, source=source,
                       constants_from=dit.file, constants_file=constants.name)
    return ComponentEntry(backend="aoti", file=package.name, sha256=sha256_file(package), precision=dit.precision,
                          inputs=spec.inputs, outputs=spec.outputs, dynamic_dims=spec.dynamic_dims, extra_files=extra,
                          build=facts)
