"""ONNX -> TensorRT plan: a plain-data build plan, a cache key, and one build function.

The plan is pure data, tested in CI; `polygraphy_loaders` turns it into polygraphy's TensorRT
loaders (network from the ONNX, builder config with the plan's profile, flags and timing cache),
which polygraphy constructs without importing TensorRT, so CI checks them too. `build_engine`
calls them; TensorRT is not installable in this project's development and CI environment, so it
runs only on a machine with an NVIDIA GPU (see tests/engines/test_tensorrt_plan.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from stdrc.export.errors import ExportError
from stdrc.runtime.backends.tensorrt import (
    COMPUTE_CAPABILITY_KEY,
    GPU_NAME_KEY,
    WEIGHTLESS_FLAG,
    import_tensorrt,
    normalize_capability,
)
from stdrc.runtime.manifest import TensorSpec, sha256_file
from stdrc.runtime.schema import BuildFacts
from stdrc.runtime.vocab import BACKEND_PRECISIONS

log = logging.getLogger(__name__)

PRECISIONS = BACKEND_PRECISIONS["tensorrt"]
# Weakly typed precision flags (TensorRT 10; removed in 11, where every network is strongly typed).
PRECISION_FLAGS = {"fp32": (), "fp16": ("FP16",), "bf16": ("BF16",), "fp8": ()}
WEIGHT_STRIPPED_FLAGS = ("REFIT", WEIGHTLESS_FLAG)  # polygraphy: refittable=True, strip_plan=True
Shape = tuple[int, ...]


class HasInterface(Protocol):
    """A ComponentEntry (manifest) or a ComponentSpec (export): named inputs + dynamic dims."""

    inputs: tuple[TensorSpec, ...]
    dynamic_dims: dict[str, list[int]]


@dataclass(frozen=True)
class TrtBuildPlan:
    """Everything `build_engine` needs, and everything that decides what it produces."""

    component: str
    onnx_path: Path
    plan_path: Path
    precision: str
    profiles: dict[str, tuple[Shape, Shape, Shape]]  # input name -> (min, opt, max)
    optimization_level: int = 3
    timing_cache: Path | None = None  # loaded if present, saved after the build
    workspace_bytes: int | None = None  # None: TensorRT's default (all device memory)
    strongly_typed: bool = False  # types come from the ONNX (Q/DQ for fp8)
    flags: tuple[str, ...] = field(default_factory=tuple)  # trt.BuilderFlag member names
    # one optimization profile per bucket (min = opt = max at its sizes); empty: `profiles` alone
    bucket_profiles: tuple[dict[str, tuple[Shape, Shape, Shape]], ...] = ()
    # refittable with its weights stripped (REFIT + STRIP_PLAN): the runtime refits it at load from the ONNX
    # beside it (`<component>.onnx`), so two plans of a two-stage bundle share one weights file
    weight_stripped: bool = False

    @property
    def builder_flags(self) -> tuple[str, ...]:
        """Every trt.BuilderFlag the plan sets (precision flags, and the weight-stripping pair)."""
        return self.flags + (WEIGHT_STRIPPED_FLAGS if self.weight_stripped else ())

    def all_profiles(self) -> tuple[dict[str, tuple[Shape, Shape, Shape]], ...]:
        """The plan's optimization profiles, in order (index = the bucket's position in the manifest)."""
        return self.bucket_profiles or (self.profiles,)

    def describe(self) -> BuildFacts:
        """The plan's facts for the manifest `build` field (no machine paths)."""
        return BuildFacts(precision=self.precision, strongly_typed=self.strongly_typed,
                          builder_flags=self.builder_flags, builder_optimization_level=self.optimization_level,
                          workspace_bytes=self.workspace_bytes,
                          profiles=dict(self.profiles), bucket_profiles=self.bucket_profiles or None)


def _dim_range(name: str, dim: int | str, dynamic_dims: Mapping[str, list[int]]) -> tuple[int, int, int]:
    if isinstance(dim, int):
        return dim, dim, dim
    if dim not in dynamic_dims:
        raise ExportError(
            f"input {name!r} has symbolic dim {dim!r} with no min/opt/max in dynamic_dims "
            f"{dict(dynamic_dims)}: add it to the component spec"
        )
    lo, opt, hi = (int(v) for v in dynamic_dims[dim])
    if not 1 <= lo <= opt <= hi:
        raise ExportError(f"dynamic dim {dim!r} = {[lo, opt, hi]} is not 1 <= min <= opt <= max: "
                          "fix the spec")
    return lo, opt, hi


def profile_shapes(
    inputs: tuple[TensorSpec, ...], dynamic_dims: Mapping[str, list[int]]
) -> dict[str, tuple[Shape, Shape, Shape]]:
    """(min, opt, max) per input: symbolic dims from `dynamic_dims`, fixed dims as they are."""
    profiles: dict[str, tuple[Shape, Shape, Shape]] = {}
    for spec in inputs:
        ranges = [_dim_range(spec.name, dim, dynamic_dims) for dim in spec.shape]
        lo, opt, hi = (tuple(r[i] for r in ranges) for i in range(3))
        profiles[spec.name] = (lo, opt, hi)
    return profiles


def plan_for(
    component: str,
    interface: HasInterface,
    precision: str,
    out_dir: str | os.PathLike,
    *,
    onnx_path: str | os.PathLike | None = None,
    optimization_level: int = 3,
    timing_cache: str | os.PathLike | None = None,
    workspace_bytes: int | None = None,
    strongly_typed: bool | None = None,
    bucket_dims: tuple[dict[str, list[int]], ...] = (),
    weight_stripped: bool = False,
) -> TrtBuildPlan:
    """The build plan of one component. `strongly_typed=None`: True for fp8, False otherwise.

    `bucket_dims` (ComponentSpec.bucket_dims): the dynamic dims at each bucket, one profile each.
    `weight_stripped`: a refittable plan without its weights, refit at load from its ONNX (two-stage DiTs).

    fp16/bf16 with `strongly_typed=True` takes its types from an ONNX already in that precision
    (the only way on TensorRT 11, which removed the FP16/BF16 builder flags).
    """
    if precision not in PRECISIONS:
        raise ExportError(f"TensorRT precision {precision!r} is not one of {', '.join(PRECISIONS)}: "
                          "use --precision fp16, bf16 or fp8")
    if not 0 <= optimization_level <= 5:
        raise ExportError(f"builder optimization level {optimization_level} is outside 0..5: use 3 (default)")
    if workspace_bytes is not None and workspace_bytes <= 0:
        raise ExportError(f"workspace limit {workspace_bytes} bytes must be > 0, "
                          "or None for TensorRT's default")
    typed = precision == "fp8" if strongly_typed is None else strongly_typed
    if precision == "fp8" and not typed:
        raise ExportError("fp8 plans are strongly typed (precision comes from the Q/DQ ONNX): "
                          "drop strongly_typed=False")
    out_dir = Path(out_dir)
    return TrtBuildPlan(
        component=component,
        onnx_path=Path(onnx_path) if onnx_path is not None else out_dir / f"{component}.onnx",
        plan_path=out_dir / f"{component}.plan",
        precision=precision,
        profiles=profile_shapes(interface.inputs, interface.dynamic_dims),
        optimization_level=optimization_level,
        timing_cache=Path(timing_cache) if timing_cache is not None else None,
        workspace_bytes=workspace_bytes,
        strongly_typed=typed,
        flags=() if typed else PRECISION_FLAGS[precision],
        bucket_profiles=tuple(profile_shapes(interface.inputs, dims) for dims in bucket_dims),
        weight_stripped=weight_stripped,
    )


def engine_cache_key(
    onnx_sha256: str, plan: TrtBuildPlan, trt_version: str, compute_capability: str | tuple[int, int]
) -> str:
    """A plan is reusable only for the same ONNX, build settings, TensorRT version and GPU arch."""
    facts = {
        "onnx_sha256": onnx_sha256,
        "component": plan.component,
        **plan.describe().to_json(),
        "tensorrt_version": trt_version,
        "compute_capability": normalize_capability(compute_capability),
    }
    digest = hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]
    cc = facts["compute_capability"].replace(".", "")
    return f"{plan.component}-{plan.precision}-trt{trt_version}-sm{cc}-{digest}"


def _write_atomic(path: Path, data: bytes | memoryview) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _has_qdq(onnx_path: Path) -> bool:
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in graph.node)


def gpu_facts_for_build() -> dict[str, str]:
    """GPU name and compute capability: cuda-python if present, else torch.cuda."""
    from stdrc.runtime.backends.tensorrt import gpu_facts

    try:
        return gpu_facts()
    except Exception as cuda_error:  # cuda-python missing or no device: try torch
        try:
            import torch

            if torch.cuda.is_available():
                major, minor = torch.cuda.get_device_capability()
                name = torch.cuda.get_device_name()
                return {GPU_NAME_KEY: name, COMPUTE_CAPABILITY_KEY: f"{major}.{minor}"}
        except ImportError:
            pass
        raise ExportError(f"cannot read the GPU's compute capability ({cuda_error}): install cuda-python "
                          "(pip install 'stdrc[gpu]') on the build machine") from cuda_error


def polygraphy_loaders(plan: TrtBuildPlan, memory_pool_limits: Mapping[Any, int] | None = None) -> tuple[Any, Any]:
    """The plan as polygraphy loaders: (NetworkFromOnnxPath, CreateConfig); nothing imports TensorRT yet.

    One optimization profile per bucket (or one for a single-bucket plan); TF32 stays off (polygraphy's default), so
    fp32 layers keep fp32 accuracy. `memory_pool_limits` maps trt.MemoryPoolType to bytes.
    """
    from polygraphy.backend.trt import CreateConfig, NetworkFromOnnxPath, Profile

    profiles = []
    for shapes in plan.all_profiles():
        profile = Profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.add(name, lo, opt, hi)
        profiles.append(profile)
    cache = plan.timing_cache if plan.timing_cache is not None and plan.timing_cache.is_file() else None
    config = CreateConfig(
        profiles=profiles, builder_optimization_level=plan.optimization_level,
        load_timing_cache=str(cache) if cache else None, memory_pool_limits=memory_pool_limits,
        refittable=plan.weight_stripped, strip_plan=plan.weight_stripped,
        **{flag.lower(): True for flag in plan.flags},  # "FP16" -> fp16=True, "BF16" -> bf16=True
    )
    return NetworkFromOnnxPath(str(plan.onnx_path), strongly_typed=plan.strongly_typed), config


def build_engine(plan: TrtBuildPlan) -> BuildFacts:
    """Parse the ONNX, build and serialize the plan (written atomically); return the build facts."""
    trt = import_tensorrt()
    if not plan.onnx_path.is_file():
        raise ExportError(f"{plan.onnx_path} does not exist: export the {plan.component} ONNX first")
    if plan.precision == "fp8" and not _has_qdq(plan.onnx_path):
        raise ExportError(f"{plan.onnx_path.name} has no QuantizeLinear/DequantizeLinear nodes: an fp8 plan "
                          "needs the Q/DQ ONNX from stdrc.calibration.fp8.export_qdq_onnx")
    missing = [flag for flag in plan.flags if not hasattr(trt.BuilderFlag, flag)]
    if missing:
        raise ExportError(f"TensorRT {trt.__version__} has no BuilderFlag.{missing[0]} (removed in "
                          f"TensorRT 11): export the ONNX in {plan.precision} and build with strongly_typed=True")
    from polygraphy.backend.trt import EngineBytesFromNetwork
    from polygraphy.exception import PolygraphyException

    gpu = gpu_facts_for_build()
    limits = {trt.MemoryPoolType.WORKSPACE: plan.workspace_bytes} if plan.workspace_bytes is not None else None
    load_network, config = polygraphy_loaders(plan, limits)
    try:
        builder, network, parser = load_network()
    except PolygraphyException as e:
        raise ExportError(f"TensorRT could not parse {plan.onnx_path.name}: {e}") from e
    names = {network.get_input(i).name for i in range(network.num_inputs)}
    if names != set(plan.profiles):
        raise ExportError(f"{plan.onnx_path.name} has inputs {sorted(names)} but the plan profiles "
                          f"{sorted(plan.profiles)}: re-export the ONNX from the same component spec")
    if plan.timing_cache is not None:
        plan.timing_cache.parent.mkdir(parents=True, exist_ok=True)
    log.info("building TensorRT %s plan for %s (%s)", plan.precision, plan.component, gpu[GPU_NAME_KEY])
    try:
        serialized = EngineBytesFromNetwork((builder, network, parser), config,
                                            save_timing_cache=str(plan.timing_cache) if plan.timing_cache else None)()
    except PolygraphyException as e:
        raise ExportError(f"TensorRT failed to build {plan.component} ({e}): try a larger workspace or a "
                          "lower builder optimization level") from e
    plan.plan_path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(plan.plan_path, memoryview(serialized))
    onnx_sha = sha256_file(plan.onnx_path)
    return replace(plan.describe(), tensorrt_version=trt.__version__, **gpu, onnx_sha256=onnx_sha,
                   cache_key=engine_cache_key(onnx_sha, plan, trt.__version__, gpu[COMPUTE_CAPABILITY_KEY]))
