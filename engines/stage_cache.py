"""The stage cache: one entry per component (its ONNX export, or its torch/aoti `.pt2` engine), keyed on
everything that changes its graph or weights.

Keys: the component's source files' sha256 (or its seed), the model config, layout, input/output shapes
and dynamic dims, export dtype, the export code and the exporters' versions (torch, onnx, onnxscript,
onnx-ir, ltx-core, transformers); the bucket only for the DiT (its RoPE tables are baked, or the fast path's
are), as every other component's engine depends on the bucket only through its spec's shapes. Large
components (above `CACHE_MAX_BYTES`) are not kept once their engine is built, so large weights exist once
on disk: in the bundle.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from stdrc.export.models import Sources
from stdrc.export.onnx_export import export_onnx, onnx_files
from stdrc.export.specs import ComponentSpec
from stdrc.runtime.manifest import Bucket, sha256_file
from stdrc.runtime.memory import trim_heap

if TYPE_CHECKING:
    from stdrc.engines.build import BuildConfig

log = logging.getLogger(__name__)

NOT_EXPORT_CODE = {"fast_path.py"}  # edits to these never change an exported graph


@functools.lru_cache(maxsize=1)
def export_code_hash() -> str:
    """Hash of the export code itself: a changed exporter never reuses a stale cached graph."""
    import stdrc.export

    digest = hashlib.sha256(stdrc.__version__.encode())
    for path in sorted(Path(stdrc.export.__file__).parent.glob("*.py")):
        if path.name not in NOT_EXPORT_CODE:
            digest.update(path.read_bytes())
    return digest.hexdigest()


# Components whose ONNX is larger than this are not kept in the stage cache once their engine is
# built: the bundle then holds the only copy of large weights (the DiT, Gemma); small ones are cached.
CACHE_MAX_BYTES = int(os.environ.get("STDRC_CACHE_MAX_BYTES", 256 * 1024**2))
_VERSIONED = ("torch", "onnx", "onnxscript", "onnx-ir", "ltx-core", "transformers")


def versions() -> dict[str, str]:
    out = {}
    for name in _VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


BUCKET_KEYED = {"dit"}  # engines that bake a bucket's facts beyond their spec's shapes (RoPE tables)


def cache_key(cfg: BuildConfig, src: Sources, bucket: Bucket, spec: ComponentSpec, dtype: torch.dtype,
              attention: str = "ort", **engine: str | bool | None) -> str:
    """Every input that changes a component's graph or weights: its source files' sha256 (or seed), the model
    config, layout, attention op kind, input/output shapes and dynamic dims, export dtype, export code, the
    exporters' versions, the bucket where the engine bakes it (`BUCKET_KEYED`), and `engine`'s facts (a
    torch/aoti engine's backend, device, precision, FP8 scales)."""
    transform = getattr(cfg.dit_transform, "sha256", None) if spec.name == "dit" else None
    if spec.name == "dit" and cfg.dit_transform is not None and transform is None:
        return ""  # an unkeyed transform: never cached
    facts = {"source": src.of()[spec.name], "preset": src.preset.to_json(),
             "bucket": bucket.to_json() if spec.name in BUCKET_KEYED else None,
             "layout": cfg.layout, "inputs": [(t.name, t.shape, t.dtype) for t in spec.inputs],
             "outputs": [(t.name, t.shape) for t in spec.outputs], "dynamic": spec.dynamic_dims,
             "dtype": str(dtype), "code": export_code_hash(), "versions": versions(), "transform": transform,
             "attention": attention, "engine": engine}
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()


def cached_onnx(cfg: BuildConfig, key: str, spec: ComponentSpec, load: Callable[[], torch.nn.Module],
                scratch: Path, attention: str = "ort") -> tuple[Path, bool]:
    """(ONNX path, kept in cache). A hit loads no weights; a miss calls `load` and exports."""
    folder = cfg.cache_dir / "onnx" / key[:24] if key else scratch / f"onnx-{spec.name}"
    path, done = folder / f"{spec.name}.onnx", folder / f"{spec.name}.done"
    if key and done.is_file() and path.is_file() and done.read_text() == sha256_file(path):
        log.info("cache hit: %s", path)
        return path, True
    folder.mkdir(parents=True, exist_ok=True)
    module = load()
    export_onnx(module, spec, path, seed=cfg.seed, attention=attention)
    del module
    release_memory()
    size = sum(f.stat().st_size for f in onnx_files(path))
    keep = bool(key) and size <= CACHE_MAX_BYTES
    if keep:
        done.write_text(sha256_file(path))
    return path, keep


def compile_target(device: str) -> str:
    """What an AOTInductor package's compiled code is specific to beyond the torch version: the GPU's
    compute capability, or the CPU's vector ISA that Inductor generates code for."""
    if device == "cuda":
        major, minor = torch.cuda.get_device_capability()
        return f"sm{major}{minor}"
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    return str(pick_vec_isa())


def cached_engine(cfg: BuildConfig, key: str, out: Path, build: Callable[[Path], None]) -> bool:
    """Write a torch/aoti engine at `out`: copied from the cache on a hit (True), else `build(out)` (a
    torch.export / AOTInductor compile) and kept in the cache when small. Copies, never links: a bundle's
    file and the cache's entry never share a mutable path."""
    folder = cfg.cache_dir / "engines" / key[:24]
    path, done = folder / out.name, folder / f"{out.name}.done"
    if key and done.is_file() and path.is_file() and done.read_text() == sha256_file(path):
        log.info("cache hit: %s", path)
        shutil.copyfile(path, out)
        return True
    build(out)
    if key and out.stat().st_size <= CACHE_MAX_BYTES:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{out.name}.tmp"
        shutil.copyfile(out, tmp)
        os.replace(tmp, path)
        done.write_text(sha256_file(path))
    return False


def release_memory() -> None:
    """Collect, then hand freed heap back to the OS (glibc keeps it otherwise): the next component starts low."""
    gc.collect()
    trim_heap()


def drop_uncached(path: Path) -> None:
    """Remove an exported ONNX that is not kept in the cache (its engine holds the weights now)."""
    shutil.rmtree(path.parent, ignore_errors=True)
