"""The refinement engine of a two-stage bundle (`dit_refine`) for ONNX Runtime, built on the `dit` engine.

`dit_refine.onnx` is the `dit` engine's graph with a low-rank branch added after each of the refinement
LoRA's target Linears: y' = y + B^T-MatMul(strength * (x A^T)), as export/refine.py's `LoraLinear`
computes. Its base initializers stay external data at the same file names and offsets as the `dit`
graph's, so both graphs read the one weights file of the `dit` component (stored once); the LoRA's A^T
and B^T go to `dit_refine.onnx.data` in the LoRA file's own dtype (a Cast feeds the compute dtype; ONNX
Runtime folds it at load), so the bundle grows by the LoRA's bytes and one graph.

Each target is found in the built `dit` graph from names the exporter and ONNX Runtime keep: the Linear's
weight itself (a Gemm on `...<key>.weight`), or its bias (`...<key>.bias`, added to a MatMul's output,
possibly fused into a Gelu) whose MatMul's weight has the target's transposed shape. A target found
nowhere, or twice, is an ExportError (never a silently missing branch).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from safetensors import safe_open

from stdrc.engines.onnxruntime import check_external_data, external_files
from stdrc.export.config import Preset
from stdrc.export.errors import ExportError
from stdrc.export.lora import LoraFile, LoraSpec
from stdrc.export.refine import write_random_lora
from stdrc.export.specs import ComponentSpec
from stdrc.runtime.manifest import ComponentEntry, sha256_file
from stdrc.runtime.vocab import ONNX_BACKENDS

log = logging.getLogger(__name__)
ALIGN = 64  # byte alignment of each tensor in the LoRA data file
RANDOM_LORA_PREFIX = "random-refine-lora-"  # the tiny presets' seeded refinement LoRA (`--two-stage`)
_TORCH_TO_ONNX = {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16,
                  torch.bfloat16: TensorProto.BFLOAT16}


@dataclass(frozen=True)
class Site:
    """Where one target Linear computes in the graph: its input, its MatMul/Gemm output, the weight's dtype."""

    key: str  # the DiT weight key (`transformer_blocks.0.attn1.to_q.weight`)
    node: int  # index of the MatMul/Gemm node
    x: str
    y: str
    dtype: int  # TensorProto data type of the weight (the compute dtype)


def externalize(path: Path, min_bytes: int = 1024) -> list[Path]:
    """An inline ONNX file rewritten with its initializers of `min_bytes` or more in `<name>.data` (the
    `dit` engine of a two-stage bundle: the refinement graph then points into that file). Returns the files."""
    model = onnx.load(str(path), load_external_data=False)
    if external_files(model):
        return [path.parent / name for name in sorted(external_files(model))]
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    onnx.save(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name,
              size_threshold=min_bytes)
    tmp.replace(path)
    return [data]


def _find_sites(graph: onnx.GraphProto, lora: LoraFile, targets: dict[str, tuple[int, ...]]) -> list[Site]:
    inits = {t.name: t for t in graph.initializer}
    producer = {out: i for i, n in enumerate(graph.node) for out in n.output}
    consumers: dict[str, list[int]] = {}
    for i, n in enumerate(graph.node):
        for name in n.input:
            consumers.setdefault(name, []).append(i)

    def by_suffix(suffix: str) -> list[str]:
        return [name for name in inits if name == suffix or name.endswith("." + suffix)]

    sites = []
    for key in sorted(lora.pairs):
        out_dim, in_dim = targets[key]
        found = []
        for name in by_suffix(key):  # a Gemm on the weight itself ([out, in], transB=1)
            for i in consumers.get(name, []):
                node = graph.node[i]
                trans = {a.name: a.i for a in node.attribute}
                if node.op_type == "Gemm" and node.input[1] == name and trans.get("transB") == 1 \
                        and not trans.get("transA") and tuple(inits[name].dims) == (out_dim, in_dim):
                    found.append(Site(key, i, node.input[0], node.output[0], inits[name].data_type))
        bias = key[: -len("weight")] + "bias"
        for name in by_suffix(bias):  # MatMul(x, W^T) -> (Add | a fused bias op)(., bias)
            for i in consumers.get(name, []):
                for other in graph.node[i].input:
                    j = producer.get(other)
                    if j is None or graph.node[j].op_type != "MatMul":
                        continue
                    w = inits.get(graph.node[j].input[1])
                    if w is not None and tuple(w.dims) == (in_dim, out_dim):
                        found.append(Site(key, j, graph.node[j].input[0], graph.node[j].output[0], w.data_type))
        found = list({s.node: s for s in found}.values())
        if len(found) != 1:
            raise ExportError(f"the dit engine has {len(found)} places computing {key} (its weight or bias by name, "
                              "a MatMul of its shape), not one: the refinement branches cannot be added; rebuild "
                              "with --backend onnxruntime at fp32 or fp16, or report the graph")
        sites.append(found[0])
    return sites


def _tensor_bytes(t: torch.Tensor) -> bytes:
    """Raw little-endian bytes of a tensor (bf16 through its int16 view: numpy has no bfloat16)."""
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().tobytes()
    return t.numpy().tobytes()


class _DataFile:
    """Tensors appended to one external-data file, each at an aligned offset."""

    def __init__(self, path: Path):
        self.path = path
        self.file = open(path, "wb")  # closed by `close`

    def add(self, name: str, t: torch.Tensor) -> TensorProto:
        offset = -self.file.tell() % ALIGN + self.file.tell()
        self.file.seek(offset)
        raw = _tensor_bytes(t)
        self.file.write(raw)
        proto = TensorProto(name=name, data_type=_TORCH_TO_ONNX[t.dtype], dims=list(t.shape))
        proto.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self.path.name), ("offset", str(offset)), ("length", str(len(raw)))):
            proto.external_data.add(key=k, value=v)
        return proto

    def close(self) -> None:
        self.file.close()


def _branch(graph: onnx.GraphProto, s: Site, tag: str, lora: LoraFile, f, data: _DataFile,
            renames: dict[str, str]) -> list[onnx.NodeProto]:
    """The nodes (and initializers, appended to `graph`) of one branch: y' = y + (s * (x A^T)) B^T.
    Short names (`tag`): the graph is copied whole, and at tiny sizes its bytes rival the LoRA's."""
    pair = lora.pairs[s.key]
    a_t = data.add(f"{tag}.A", f.get_tensor(pair.down).t())  # A^T [in, rank]
    b_t = data.add(f"{tag}.B", f.get_tensor(pair.up).t())  # B^T [rank, out]
    strength = numpy_helper.from_array(np.array(lora.strength, helper.tensor_dtype_to_np_dtype(s.dtype)),
                                       f"{tag}.s")
    graph.initializer.extend([a_t, b_t, strength])
    nodes, a_in, b_in = [], a_t.name, b_t.name
    if a_t.data_type != s.dtype:  # the LoRA's dtype on disk, the engine's in compute (folded at load)
        nodes += [helper.make_node("Cast", [a_t.name], [f"{tag}.a"], to=s.dtype, name=f"{tag}.ca"),
                  helper.make_node("Cast", [b_t.name], [f"{tag}.b"], to=s.dtype, name=f"{tag}.cb")]
        a_in, b_in = f"{tag}.a", f"{tag}.b"
    x = renames.get(s.x, s.x)  # the input as the graph now names it
    return nodes + [
        helper.make_node("MatMul", [x, a_in], [f"{tag}.l"], name=f"{tag}.down"),
        helper.make_node("Mul", [f"{tag}.l", strength.name], [f"{tag}.m"], name=f"{tag}.mul"),
        helper.make_node("MatMul", [f"{tag}.m", b_in], [f"{tag}.d"], name=f"{tag}.up"),
        helper.make_node("Add", [s.y, f"{tag}.d"], [renames[s.y]], name=f"{tag}.add"),
    ]


def build_refine_graph(dit_engine: Path, out: Path, lora: LoraFile, targets: dict[str, tuple[int, ...]]) -> list[Path]:
    """`out` (dit_refine.onnx) from the `dit_engine` graph (ONNX Runtime's engine, or the exported graph a
    TensorRT plan is refit from) and `lora`; returns its own extra files.

    `targets`: the DiT's key -> shape map (export/lora.py `dit_shapes`). Reads the dit graph without its
    weights and the LoRA's A/B; the base weights are neither read nor written."""
    model = onnx.load(str(dit_engine), load_external_data=False)
    if not external_files(model):
        raise ExportError(f"{dit_engine.name} holds its weights inline: externalize it first (a two-stage bundle "
                          "shares the dit weights file)")
    graph = model.graph
    sites = _find_sites(graph, lora, targets)
    renames = {s.y: f"lora{i}.y" for i, s in enumerate(sites)}
    for o in graph.output:
        if o.name in renames:
            raise ExportError(f"{o.name} is a graph output and a LoRA target's output: rebuild without that target")
    for node in graph.node:  # every reader of a target's output reads the output with its branch added
        for k, name in enumerate(node.input):
            if name in renames:
                node.input[k] = renames[name]
    data = _DataFile(out.with_name(out.name + ".data"))
    added: dict[int, list[onnx.NodeProto]] = {}
    try:
        with safe_open(str(lora.path), framework="pt") as f:
            for i, s in enumerate(sites):
                added[s.node] = _branch(graph, s, f"lora{i}", lora, f, data, renames)
    finally:
        data.close()
    nodes = []
    for i, node in enumerate(graph.node):
        nodes.append(node)
        nodes.extend(added.get(i, []))  # right after its Linear: topological order kept
    del graph.node[:]
    graph.node.extend(nodes)
    tmp = out.with_name(f".{out.name}.tmp")
    onnx.save(model, str(tmp))
    check_external_data(onnx.load(str(tmp), load_external_data=False), out.parent)
    tmp.replace(out)
    log.info("dit_refine: %d LoRA branches on the dit engine's weights", len(sites))
    return [data.path]


def stage_refit_onnx(exported: Path, staging: Path) -> Path:
    """The exported DiT ONNX placed in the bundle as `dit.onnx` with its weights in `dit.onnx.data` (hard-linked
    from the export, or externalized there): a weight-stripped TensorRT plan is refit from it at load."""
    from stdrc.engines.onnxruntime import _place

    names = {exported.name, *external_files(onnx.load(str(exported), load_external_data=False))}
    _place(names, exported.parent, staging, move=False)
    target = staging / exported.name
    externalize(target)
    return target


def random_refine_lora(preset: Preset, seed: int, folder: Path) -> LoraSpec:
    """The tiny presets' refinement LoRA for `--two-stage` without `--refine-lora`: seeded, rank RANDOM_RANK, in
    `folder` (the stage cache) under a name that says what it is; `verify` rebuilds the same file from the name."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{RANDOM_LORA_PREFIX}{preset.name}-seed{seed}.safetensors"
    if not path.is_file():
        write_random_lora(path, preset.dit, seed=seed)
    return LoraSpec(path, 1.0)


def refine_lora_spec(given: LoraSpec | None, preset: Preset, seed: int, folder: Path) -> LoraSpec:
    """The refinement LoRA of a two-stage build: the one given, else (tiny presets) the seeded random one."""
    return given if given is not None else random_refine_lora(preset, seed, folder)


def refine_source(lora: LoraFile) -> dict:
    """The refinement LoRA as a component source (BuildFacts.source)."""
    return {"refine_lora": {"file": lora.path.name, "sha256": lora.sha256, "strength": lora.strength}}


def refine_component(dit: ComponentEntry, staging: Path, spec: ComponentSpec, lora: LoraFile,
                     targets: dict[str, tuple[int, ...]], timing_cache: Path | None = None) -> ComponentEntry:
    """The `dit_refine` entry, built on the staged `dit` component.

    ONNX Runtime: the dit engine's graph with the branches (`dit_refine.onnx`). TensorRT: the same on the dit's
    refit ONNX (`dit.onnx` beside its weight-stripped plan), then a weight-stripped plan of it, refit at load.
    Its files: the graph (and plan), the dit's weights file(s) it reads (listed with the dit entry's sha256) and
    the LoRA's data file."""
    graph = staging / f"{spec.name}.onnx"
    base = staging / (dit.file if dit.backend == "onnxruntime" else Path(dit.file).with_suffix(".onnx").name)
    if dit.backend not in ONNX_BACKENDS or not base.is_file():
        raise ExportError(f"the refinement engine is built on an ONNX Runtime or weight-stripped TensorRT dit, not "
                          f"{dit.backend}: pass --backend onnxruntime (or tensorrt) for a two-stage bundle")
    own = build_refine_graph(base, graph, lora, targets)
    shared = {name: dit.extra_files[name] for name in external_files(onnx.load(str(graph), load_external_data=False))
              if name in dit.extra_files}
    extra = {**shared, **{f.name: sha256_file(f) for f in own}}
    file, facts = graph, dit.build
    if dit.backend == "tensorrt":
        from stdrc.engines.tensorrt import build_engine, plan_for

        plan = plan_for(spec.name, spec, dit.precision, staging, onnx_path=graph, timing_cache=timing_cache,
                        bucket_dims=spec.bucket_dims, weight_stripped=True)
        facts = build_engine(plan)
        extra[graph.name] = sha256_file(graph)
        file = plan.plan_path
    return ComponentEntry(backend=dit.backend, file=file.name, sha256=sha256_file(file), precision=dit.precision,
                          inputs=spec.inputs, outputs=spec.outputs, dynamic_dims=spec.dynamic_dims, extra_files=extra,
                          build=replace(facts, source=refine_source(lora)))
