"""`build-engines`: checkpoint or preset -> ONNX per component -> engines -> one bundle folder."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import stdrc
from stdrc.engines.bundle import BundleWriter
from stdrc.export.errors import ExportError
from stdrc.export.lora import LoraSpec
from stdrc.export.models import ModelSet, load_models
from stdrc.export.onnx_export import dynamic_shapes, export_onnx, onnx_files
from stdrc.export.specs import ComponentSpec, component_specs
from stdrc.runtime.manifest import Bucket, ComponentEntry, Manifest, sha256_file
from stdrc.runtime.sampler import DISTILLED_SIGMAS, ltx2_sigmas
from stdrc.runtime.tiling import decode_tiling

log = logging.getLogger(__name__)
BACKENDS = ("auto", "onnxruntime", "tensorrt", "torch", "aoti")
ENGINE_SUFFIX = {"onnxruntime": ".onnx", "torch": ".pt2", "aoti": ".pt2", "tensorrt": ".plan"}
SCHEDULE = {"kind": "ltx2", "max_shift": 2.05, "base_shift": 0.95, "terminal": 0.1, "shift_tokens": 4096}


@dataclass(frozen=True)
class BuildConfig:
    """What to build. Bucket fields left as None take the preset's default bucket."""

    preset: str = "tiny"
    checkpoint: Path | None = None
    frames: int | None = None
    height: int | None = None
    width: int | None = None
    fps: float | None = None
    backend: str = "auto"
    precision: str = "fp32"
    out: Path = Path("bundles/tiny")
    cache_dir: Path = Path(os.environ.get("STDRC_CACHE", Path.home() / ".cache" / "stdrc"))
    seed: int = 0
    layout: str = "tass"
    face_weights: Path | None = None
    text_encoder: Path | None = None  # a local Gemma-3 folder
    text_checkpoint: Path | None = None  # LTX-2 checkpoint holding the text projection + connector
    loras: tuple[LoraSpec, ...] = ()  # fused into the DiT weights, in order
    calibrate_fp8: bool = False
    decode_tile: int | None = None  # pixels; None = 512 when the bucket is larger, 0 = never tile
    decode_overlap: int = 64  # pixels
    attention: str | None = None  # export/attention.py kind; None = the backend's (ort, or onnx for TensorRT)
    progress: bool = True


def resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ExportError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    has_trt = importlib.util.find_spec("tensorrt") is not None
    return "tensorrt" if has_trt and torch.cuda.is_available() else "onnxruntime"


def bucket_for(cfg: BuildConfig, models: ModelSet) -> Bucket:
    d = models.preset.default_bucket
    return Bucket(
        frames=cfg.frames or d["frames"], height=cfg.height or d["height"], width=cfg.width or d["width"],
        text_length=models.preset.text.max_length, fps=cfg.fps or d["fps"],
    )


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


ATTENTION_FOR = {"onnxruntime": "ort", "tensorrt": "onnx"}  # TensorRT's parser takes no com.microsoft op


def cached_onnx(cfg: BuildConfig, models: ModelSet, bucket: Bucket, spec: ComponentSpec,
                module: torch.nn.Module, backend: str = "onnxruntime") -> Path:
    """The stage cache: keyed by source hash + bucket + layout + attention + input shapes + export code."""
    attention = cfg.attention or ATTENTION_FOR[backend]
    key = f"{models.source_sha256[:16]}/{bucket.key()}_{cfg.layout}_{attention}_{export_code_hash()[:12]}"
    folder = cfg.cache_dir / "onnx" / key
    shapes = hashlib.sha256(repr([t.shape for t in spec.inputs]).encode()).hexdigest()[:8]
    path = folder / f"{spec.name}_{shapes}.onnx"
    done = folder / f"{spec.name}_{shapes}.done"
    if done.is_file() and path.is_file() and done.read_text() == sha256_file(path):
        log.info("cache hit: %s", path)
        return path
    folder.mkdir(parents=True, exist_ok=True)
    export_onnx(module, spec, path, seed=cfg.seed, attention=attention)
    done.write_text(sha256_file(path))
    return path


def _torch_engine(module: torch.nn.Module, spec: ComponentSpec, out: Path, backend: str, device: str) -> dict:
    feeds = spec.sample_inputs()
    args = tuple(torch.from_numpy(feeds[t.name]).to(device) for t in spec.inputs)
    with torch.no_grad():
        program = torch.export.export(module.to(device), args, dynamic_shapes=dynamic_shapes(spec))
    tmp = out.with_name(f".{out.stem}.tmp{out.suffix}")  # aoti_compile_and_package wants a .pt2 name
    tmp.unlink(missing_ok=True)
    if backend == "torch":
        torch.export.save(program, str(tmp))
    else:
        torch._inductor.aoti_compile_and_package(program, package_path=str(tmp))
    os.replace(tmp, out)
    return {"torch_version": torch.__version__, "device": device}


def fast_dit(cfg: BuildConfig, models: ModelSet, bucket: Bucket, fp8_scales: Path | None,
             device: str) -> torch.nn.Module:
    """The DiT on the PyTorch fast path (bf16, FP8 GEMMs with the calibrated scales) for torch/aoti engines."""
    from stdrc.export.fast_path import FastPathOptions, load_fp8_scales, prepare_fast_dit

    _, tables = models.rope(bucket, cfg.layout)
    scales = load_fp8_scales(fp8_scales) if fp8_scales is not None else None
    return prepare_fast_dit(models.dit, tables.cos, tables.sin, FastPathOptions(fp8=fp8_scales is not None),
                            scales, device)


def fp8_qdq_onnx(cfg: BuildConfig, models: ModelSet, bucket: Bucket, folder: Path) -> Path:
    """The DiT calibrated with modelopt and exported with FP8 Q/DQ nodes, for a strongly typed TensorRT plan."""
    from stdrc.calibration.fp8 import export_qdq_onnx
    from stdrc.calibration.report import calibrate_dit_fp8
    from stdrc.export.dit import BakedRopeDiT

    qdit, captured = calibrate_dit_fp8(models, bucket, cfg.layout)
    _, tables = models.rope(bucket, cfg.layout)
    feeds = {k: v for k, v in captured[0].items() if not k.startswith("rope_")}
    lo, _, hi = component_specs(models.preset, bucket)["dit"].dynamic_dims["batch"]
    return export_qdq_onnx(BakedRopeDiT(qdit, tables.cos, tables.sin), folder / "dit.onnx", feeds, (lo, hi))


def text_manifest(models: ModelSet, writer: BundleWriter) -> dict:
    """The tokenizer the runtime runs: bytes for `tiny`, else Gemma's tokenizer.json (run with `tokenizers`)."""
    cfg = models.preset.text
    if models.gemma is None:
        return {"tokenizer": "bytes", "max_length": cfg.max_length}
    path = writer.path("tokenizer.json")
    path.write_text(models.gemma.tokenizer_json(), encoding="utf-8")
    return {"tokenizer": "hf-tokenizers", "file": path.name, "sha256": sha256_file(path),
            "max_length": cfg.max_length, "pad_id": models.gemma.pad_id, "padding_side": "left"}


def build_component(cfg: BuildConfig, backend: str, models: ModelSet, bucket: Bucket, spec: ComponentSpec,
                    module: torch.nn.Module, writer: BundleWriter) -> ComponentEntry:
    out = writer.path(spec.name + ENGINE_SUFFIX[backend])
    extra: dict[str, str] = {}
    precision = cfg.precision
    if backend == "onnxruntime":
        from stdrc.engines.onnxruntime import build_ort_engine

        onnx_path = cached_onnx(cfg, models, bucket, spec, module)
        facts = build_ort_engine(onnx_path, out, precision)
        extra = {f.name: sha256_file(f) for f in onnx_files(out)[1:]}
    elif backend in ("torch", "aoti"):
        if precision == "fp16":
            raise ExportError(f"--backend {backend} builds fp32, bf16 or fp8 engines: use --precision bf16")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        if spec.name == "dit" and precision != "fp32":
            scales = None
            if precision == "fp8":
                from stdrc.calibration.report import FP8_SCALES_FILE  # build_engines calibrated before this

                scales = writer.path(FP8_SCALES_FILE)
            module = fast_dit(cfg, models, bucket, scales, device)
        else:
            precision = "fp32"  # the low-precision fast path is the DiT's; the rest stays fp32
        facts = _torch_engine(module, spec, out, backend, device)
    else:
        from stdrc.engines.tensorrt import build_engine, plan_for

        if precision == "fp8" and spec.name == "dit":
            folder = cfg.cache_dir / "fp8_qdq" / f"{models.source_sha256[:16]}_{bucket.key()}_{cfg.layout}"
            onnx_path = fp8_qdq_onnx(cfg, models, bucket, folder)
        else:
            onnx_path = cached_onnx(cfg, models, bucket, spec, module, backend)
        plan = plan_for(spec.name, spec, precision, writer.staging, onnx_path=onnx_path,
                        timing_cache=cfg.cache_dir / "trt_timing.cache")
        facts = build_engine(plan)
        out = plan.plan_path
    return ComponentEntry(
        backend=backend, file=out.name, sha256=sha256_file(out), precision=precision,
        inputs=spec.inputs, outputs=spec.outputs, dynamic_dims=spec.dynamic_dims, extra_files=extra, build=facts,
    )


def build_engines(cfg: BuildConfig) -> Path:
    """Build every component for one bucket and write the bundle at `cfg.out` (atomically)."""
    backend = resolve_backend(cfg.backend)
    stages = tqdm(total=7, desc="build-engines", unit="stage", disable=not cfg.progress)
    stages.set_postfix_str("loading model")
    models = load_models(cfg.preset, cfg.checkpoint, cfg.seed, cfg.face_weights,
                         text_encoder=cfg.text_encoder, text_checkpoint=cfg.text_checkpoint, loras=cfg.loras)
    bucket = bucket_for(cfg, models)
    stages.update()
    tiling = decode_tiling(bucket.height, bucket.width, cfg.decode_tile, cfg.decode_overlap)
    specs = component_specs(models.preset, bucket, tiling)
    modules = models.export_modules(bucket, cfg.layout)
    with BundleWriter(cfg.out) as writer:
        quality = {}
        if cfg.calibrate_fp8 or (cfg.precision == "fp8" and backend in ("torch", "aoti")):
            stages.set_postfix_str("fp8 calibration")
            from stdrc.calibration.report import fp8_quality

            quality["fp8"] = fp8_quality(models, bucket, cfg.layout, writer.staging, seed=cfg.seed)
        components = {}
        for name in ("text_encoder", "dit", "vae_encoder", "vae_decoder", "face_encoder"):
            stages.set_postfix_str(f"{name} ({backend})")
            if name in modules:
                components[name] = build_component(cfg, backend, models, bucket, specs[name], modules[name], writer)
            stages.update()
        text = text_manifest(models, writer)
        if "file" in text:
            components["text_encoder"] = replace(
                components["text_encoder"],
                extra_files={**components["text_encoder"].extra_files, text["file"]: text["sha256"]})
        positions, tables = models.rope(bucket, cfg.layout)
        rope_path = writer.path("rope.npz")
        with open(rope_path, "wb") as f:
            np.savez(f, positions=positions.numpy(), cos=tables.cos.numpy(), sin=tables.sin.numpy())
        if quality:
            extra_files = {quality["fp8"]["scales_file"]: quality["fp8"]["scales_sha256"]}
            components["dit"] = replace(components["dit"], extra_files={**components["dit"].extra_files,
                                                                         **extra_files})
        from stdrc.runtime.memory import activation_bytes, component_weight_bytes

        memory = {
            "weight_bytes": {k: component_weight_bytes(writer.staging, e.file, e.extra_files)
                             for k, e in components.items()},
            "activation_bytes": {k: activation_bytes(k, {"dit": asdict(models.preset.dit),
                                                         "vae": asdict(models.preset.vae),
                                                         "text": asdict(models.preset.text)},
                                                     bucket.to_json(), e.precision,
                                                     tiling.to_json() if tiling else {})
                                 for k, e in components.items()},
            "note": "weights: engine files' bytes; activations: estimates (stdrc.runtime.memory)",
        }
        manifest = Manifest(
            preset=models.preset.name,
            model_config={"dit": asdict(models.preset.dit), "vae": asdict(models.preset.vae),
                          "text": asdict(models.preset.text), "seed": cfg.seed},
            checkpoint_sha256=models.checkpoint_sha256,
            bucket=bucket,
            components=components,
            sampler={**SCHEDULE, "steps": models.preset.steps,
                     "sigmas": [float(s) for s in ltx2_sigmas(models.preset.steps)],
                     "distilled_sigmas": list(DISTILLED_SIGMAS)},
            guidance={"text_scale": models.preset.text_scale, "ref_scale": models.preset.ref_scale,
                      "null_reference": "key_mask"},
            rope={"file": rope_path.name, "sha256": sha256_file(rope_path), "layout": cfg.layout,
                  "type": models.preset.dit.rope_type, "baked_in_dit": True,
                  "max_position_ratio": tables.max_position_ratio},
            text=text,
            reference={"layout": cfg.layout, "video_tokens": bucket.video_tokens,
                       "reference_tokens": bucket.reference_tokens, "timestep": 0.0},
            quality=quality,
            decode=tiling.to_json() if tiling else {},
            memory=memory,
            created_by={"stdrc": stdrc.__version__, "torch": torch.__version__, "backend": backend,
                        "source_sha256": models.source_sha256},
            loras=models.loras.entries() if models.loras else (),
        )
        stages.set_postfix_str("writing manifest")
        path = writer.commit(manifest)
        stages.update()
    stages.close()
    return path


def clear_cache(cache_dir: Path) -> None:
    shutil.rmtree(cache_dir / "onnx", ignore_errors=True)
