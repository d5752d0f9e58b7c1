"""`build-engines`: checkpoint or preset -> ONNX per component -> engines -> one bundle folder."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import stdrc
from stdrc.engines.aoti import CONSTANTS_SUFFIX, refine_entry, refine_package, torch_engine, write_branch_constants
from stdrc.engines.bundle import BundleWriter
from stdrc.engines.preflight import check_build, check_disk
from stdrc.engines.refine import externalize, refine_component, refine_lora_spec, refine_source, stage_refit_onnx
from stdrc.engines.stage_cache import (
    cache_key,
    cached_engine,
    cached_onnx,
    compile_target,
    drop_uncached,
    release_memory,
    versions,
)
from stdrc.export.bundle_manifest import assemble_manifest
from stdrc.export.config import get_preset
from stdrc.export.errors import ExportError
from stdrc.export.lora import Fp8LoraTransform, LoraFile, LoraSpec, dit_shapes, lora_transform
from stdrc.export.models import ModelSet, Sources, load_sources, plan_sources
from stdrc.export.onnx_export import CastIO, onnx_files
from stdrc.export.refine import load_refine_lora
from stdrc.export.specs import STATE_DTYPES, ComponentSpec, component_specs
from stdrc.runtime.manifest import Bucket, ComponentEntry, sha256_file
from stdrc.runtime.memory import activation_bytes, component_weight_bytes
from stdrc.runtime.schema import (
    BuildFacts,
    CreatedBy,
    MemoryConfig,
    ModelConfig,
    QualityConfig,
    Stage1Tables,
    TableFile,
    TextConfig,
    TwoStageConfig,
)
from stdrc.runtime.vocab import BACKENDS, COMPONENTS, ONNX_BACKENDS, STAGE_COMPONENTS, TORCH_BACKENDS

log = logging.getLogger(__name__)
ENGINE_SUFFIX = {"onnxruntime": ".onnx", "torch": ".pt2", "aoti": ".pt2", "tensorrt": ".plan"}
ATTENTION_FOR = {"onnxruntime": "ort", "tensorrt": "onnx"}  # export/attention.py; TensorRT takes no com.microsoft op


@dataclass(frozen=True)
class BuildConfig:
    """What to build. Bucket fields left as None take the preset's default bucket.

    `buckets`: several sizes, each "FRAMESxWIDTHxHEIGHT" or (frames, height, width), the first the default
    (instead of frames/height/width). `rope`: auto (baked for one bucket, input for several), input, baked.
    """

    preset: str = "tiny"
    checkpoint: Path | None = None
    buckets: tuple = ()
    rope: str = "auto"
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
    base_checkpoint: Path | None = None  # the LTX-2 file beside a DiT-only checkpoint: VAE + text projection
    calibrate_fp8: bool = False
    decode_tile: int | None = None  # pixels; None = 512 when the bucket is larger, 0 = never tile
    decode_overlap: int = 64  # pixels
    loras: tuple[LoraSpec, ...] = ()  # fused into the DiT weights tensor by tensor, in order
    # two stages (both files, or `two_stage` on a tiny preset: random tiny pieces; docs/design.md)
    upsampler: Path | None = None  # Lightricks' x2 spatial latent upsampler .safetensors
    refine_lora: LoraSpec | None = None  # the distilled LoRA of stage 2, as low-rank branches of `dit_refine`
    two_stage: bool = False
    attention: str | None = None  # export/attention.py kind; None = the backend's (ort, or onnx for TensorRT)
    progress: bool = True
    # applied to every DiT tensor as it is read (LoRA fusion); a `sha256` attribute keys it in the stage cache
    dit_transform: Callable | None = None
    # called as (component name, staging folder) after each component (benchmarks/build_memory.py)
    on_component: Callable | None = None

    @property
    def base(self) -> Path | None:
        return self.base_checkpoint

    @property
    def is_two_stage(self) -> bool:
        """A two-stage bundle: both stage files given, or `two_stage` (tiny presets: random pieces)."""
        return self.two_stage or (self.upsampler is not None and self.refine_lora is not None)


def resolve_backend(backend: str) -> str:
    if backend != "auto" and backend not in BACKENDS:
        raise ExportError(f"unknown backend {backend!r}: choose auto or one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    has_trt = importlib.util.find_spec("tensorrt") is not None
    return "tensorrt" if has_trt and torch.cuda.is_available() else "onnxruntime"


def module_dtype(backend: str, precision: str) -> torch.dtype:
    """The dtype weights are loaded and exported in: fp16/bf16 ONNX is written directly for ORT/TensorRT."""
    if backend in ONNX_BACKENDS and precision in ("fp16", "bf16"):
        return torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.float32


def fast_dit(cfg: BuildConfig, models: ModelSet, bucket: Bucket, fp8_scales: Path | None,
             device: str, from_file: bool = False) -> torch.nn.Module:
    """The DiT on the PyTorch fast path (bf16, FP8 GEMMs with the bundle's scales: calibrated, or the
    pre-quantized checkpoint's own when `from_file`) for torch/aoti engines."""
    from stdrc.export.fast_path import FastPathOptions, load_fp8_scales, prepare_fast_dit

    _, tables = models.rope(bucket, cfg.layout)
    scales = load_fp8_scales(fp8_scales) if fp8_scales is not None else None
    return prepare_fast_dit(models.dit, tables.cos, tables.sin, FastPathOptions(fp8=fp8_scales is not None),
                            scales, device, scales_from_file=from_file)


def scales_from_file(cfg: BuildConfig, src: Sources) -> bool:
    """FP8 engines from a pre-quantized checkpoint take its own scales (`--calibrate-fp8` overrides them)."""
    return cfg.precision == "fp8" and not cfg.calibrate_fp8 and src.checkpoint is not None \
        and src.checkpoint.fp8 is not None


def checkpoint_fp8_scales(cfg: BuildConfig, src: Sources) -> dict[str, float]:
    """The checkpoint's scales as `fp8_scales.json` holds them; a LoRA's requantised weights' scales (set while
    the DiT is read: call after loading it) replace the file's."""
    from stdrc.export.fp8_scaled import file_scales

    return file_scales(src.checkpoint.linear_scales("dit"), getattr(cfg.dit_transform, "weight_scales", None))


def file_qdq_onnx(cfg: BuildConfig, models: ModelSet, bucket: Bucket, spec: ComponentSpec, scales: dict[str, float],
                  folder: Path) -> Path:
    """The DiT with a pre-quantized checkpoint's scales as its Q/DQ scales (no calibration): its FP8 weights as
    initializers behind DequantizeLinear, its inputs quantized with its `input_scale`s, for TensorRT."""
    from stdrc.calibration.fp8 import export_qdq_onnx
    from stdrc.export.dit import BakedRopeDiT
    from stdrc.export.fp8_scaled import scaled_fp8_dit

    _, tables = models.rope(bucket, cfg.layout)
    feeds = {k: torch.from_numpy(v) for k, v in spec.sample_inputs().items()}
    lo, _, hi = spec.dynamic_dims["batch"]
    baked = BakedRopeDiT(scaled_fp8_dit(models.dit, scales), tables.cos, tables.sin)
    return export_qdq_onnx(baked, folder / "dit.onnx", feeds, (lo, hi))


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


def text_manifest(models: ModelSet, writer: BundleWriter) -> TextConfig:
    """The tokenizer the runtime runs: bytes for `tiny`, else Gemma's tokenizer.json (run with `tokenizers`)."""
    cfg = models.preset.text
    if models.gemma is None:
        return TextConfig(tokenizer="bytes", max_length=cfg.max_length)
    path = writer.path("tokenizer.json")
    path.write_text(models.gemma.tokenizer_json(), encoding="utf-8")
    return TextConfig(tokenizer="hf-tokenizers", file=path.name, sha256=sha256_file(path),
                      max_length=cfg.max_length, pad_id=models.gemma.pad_id, padding_side="left")


def _fp32_models(src: Sources, cfg: BuildConfig) -> ModelSet:
    """Every component in fp32 at once: only the calibration and torch fast paths need this."""
    return load_sources(src, COMPONENTS, torch.float32, cfg.dit_transform)


def build_component(cfg: BuildConfig, backend: str, src: Sources, bucket: Bucket, spec: ComponentSpec,
                    writer: BundleWriter, full: Callable[[], ModelSet]) -> ComponentEntry:
    """One component's engine; its weights are loaded (on a cache miss) and released before the next.

    `bucket` is the default; a spec with RoPE inputs (several buckets) exports the DiT without tables."""
    rope_input = any(t.name == "rope_cos" for t in spec.inputs)
    out = writer.path(spec.name + ENGINE_SUFFIX[backend])
    extra: dict[str, str] = {}
    precision = cfg.precision
    dtype = module_dtype(backend, precision)

    attention = cfg.attention or ATTENTION_FOR.get(backend, "ort")

    def load() -> torch.nn.Module:
        one = load_sources(src, (spec.name,), dtype, cfg.dit_transform)
        module = one.export_modules(bucket, cfg.layout, rope_input)[spec.name]
        return CastIO(module) if dtype != torch.float32 else module

    if backend == "onnxruntime":
        from stdrc.engines.onnxruntime import build_ort_engine, store_bf16_weights

        onnx_path, kept = cached_onnx(cfg, cache_key(cfg, src, bucket, spec, dtype, attention), spec, load,
                                          writer.staging, attention)
        facts = build_ort_engine(onnx_path, out, precision, move=not kept)
        if not kept:
            drop_uncached(onnx_path)
        if spec.name == "dit" and cfg.is_two_stage:  # dit_refine reads its weights file (engines/refine.py)
            externalize(out)
        if spec.name == "upsampler" and precision == "fp32":  # a bf16 file's weights keep its bytes on disk
            store_bf16_weights(out)
        extra = {f.name: sha256_file(f) for f in onnx_files(out)[1:]}
    elif backend in TORCH_BACKENDS:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        scales = None
        if spec.name == "dit" and precision == "fp8":
            from stdrc.calibration.report import FP8_SCALES_FILE  # build_engines calibrated before this

            scales = writer.path(FP8_SCALES_FILE)
        elif spec.name != "dit" or precision == "fp32":
            precision = "fp32"  # the low-precision fast path is the DiT's; the rest stays fp32

        def compile_engine(path: Path) -> None:
            # the one-stage set at once (the DiT's fast path needs it); a stage component alone
            models = full() if spec.name in COMPONENTS else load_sources(src, (spec.name,), torch.float32)
            module = models.export_modules(bucket, cfg.layout, rope_input)[spec.name]
            if spec.name == "dit" and precision != "fp32":
                module = fast_dit(cfg, models, bucket, scales, device, scales_from_file(cfg, src))
            torch_engine(module, spec, path, backend, device)

        key = cache_key(cfg, src, bucket, spec, torch.float32, attention, backend=backend, device=device,
                        precision=precision, scales=sha256_file(scales) if scales else None,
                        scales_from_file=scales_from_file(cfg, src),
                        target=compile_target(device) if backend == "aoti" else None)
        cached_engine(cfg, key, out, compile_engine)
        facts = BuildFacts(torch_version=torch.__version__, device=device)
    else:
        from stdrc.engines.tensorrt import build_engine, plan_for

        kept = True
        if precision == "fp8" and spec.name == "dit":
            folder = cfg.cache_dir / "fp8_qdq" / cache_key(cfg, src, bucket, spec, torch.float32)[:24]
            if scales_from_file(cfg, src):
                models = full()  # the DiT read first: a LoRA's requantised scales are known then
                onnx_path = file_qdq_onnx(cfg, models, bucket, spec, checkpoint_fp8_scales(cfg, src), folder)
            else:
                onnx_path = fp8_qdq_onnx(cfg, full(), bucket, folder)
        else:
            onnx_path, kept = cached_onnx(cfg, cache_key(cfg, src, bucket, spec, dtype, attention), spec, load,
                                          writer.staging, attention)
        stripped = spec.name == "dit" and cfg.is_two_stage  # refit at load from dit.onnx, shared with dit_refine
        refit = stage_refit_onnx(onnx_path, writer.staging) if stripped else onnx_path
        plan = plan_for(spec.name, spec, precision, writer.staging, onnx_path=refit,
                        timing_cache=cfg.cache_dir / "trt_timing.cache", bucket_dims=spec.bucket_dims,
                        weight_stripped=stripped)
        facts = build_engine(plan)
        if stripped:
            extra = {f.name: sha256_file(f) for f in onnx_files(refit)}
        if not kept:
            drop_uncached(onnx_path)
        out = plan.plan_path
    facts = replace(facts, source=src.of()[spec.name])
    return ComponentEntry(
        backend=backend, file=out.name, sha256=sha256_file(out), precision=precision,
        inputs=spec.inputs, outputs=spec.outputs, dynamic_dims=spec.dynamic_dims, extra_files=extra, build=facts,
    )


def aoti_refine_component(cfg: BuildConfig, src: Sources, bucket: Bucket, specs: dict[str, ComponentSpec],
                          dit: ComponentEntry, lora: LoraFile, writer: BundleWriter) -> ComponentEntry:
    """`dit_refine` for aoti (engines/aoti.py): the refinement package without constants (cached like the other
    engines: a hit reads no weight), the branches' A/B beside it, the `dit` package named as its weights."""
    spec, device = specs["dit_refine"], dit.build.device
    out = writer.path(spec.name + ENGINE_SUFFIX["aoti"])

    def compile_engine(path: Path) -> None:
        models = load_sources(src, ("dit",), torch.float32, cfg.dit_transform)
        refine_package(models.export_modules(bucket, cfg.layout, rope_input=True)["dit"], lora, spec, path, device)

    key = cache_key(cfg, src, bucket, specs["dit"], torch.float32, cfg.attention or "ort", backend="aoti",
                    device=device, precision=dit.precision, target=compile_target(device), component=spec.name,
                    lora=lora.sha256, strength=lora.strength)
    cached_engine(cfg, key, out, compile_engine)
    constants = write_branch_constants(lora, writer.path(spec.name + CONSTANTS_SUFFIX))
    return refine_entry(dit, out, constants, spec, refine_source(lora))


def write_rope_tables(models: ModelSet, buckets: tuple[Bucket, ...], layout: str,
                      writer: BundleWriter, two_stage: bool = False) -> tuple[tuple[Bucket, ...], float]:
    """One table file per bucket (`rope.npz` for the default, `rope_FxWxH.npz` for the others): positions,
    cos, sin; `two_stage`: also its stage-1 grid's (`rope_s1.npz`, `rope_s1_FxWxH.npz`, of `Bucket.half()`).
    Returns the buckets naming their files, and the largest position ratio over them."""
    named, ratio = [], 0.0

    def write(grid: Bucket, name: str) -> TableFile:
        nonlocal ratio
        positions, tables = models.rope(grid, layout)
        path = writer.path(name)
        with open(path, "wb") as f:
            np.savez(f, positions=positions.numpy(), cos=tables.cos.numpy(), sin=tables.sin.numpy())
        ratio = max(ratio, tables.max_position_ratio)
        return TableFile(file=path.name, sha256=sha256_file(path))

    for i, b in enumerate(buckets):
        suffix = "" if i == 0 else f"_{b.label()}"
        b = replace(b, rope=write(b, f"rope{suffix}.npz"))
        if two_stage:
            b = replace(b, stage1=Stage1Tables(rope=write(b.half(), f"rope_s1{suffix}.npz")))
        named.append(b)
    return tuple(named), ratio


def build_engines(cfg: BuildConfig) -> Path:
    """Build every component for the buckets of `cfg` and write the bundle at `cfg.out` (atomically).

    One engine per component serves every bucket (dynamic dims; a TensorRT profile per bucket); the
    weights are stored once, and each bucket adds its RoPE table file.

    Arguments are checked first (`check_build`), then checkpoint headers (`plan_sources`); weights are
    read one component at a time, each released before the next.
    """
    backend = resolve_backend(cfg.backend)
    buckets, tiling, rope = check_build(cfg, backend)
    bucket = buckets[0]
    stages = tqdm(total=2 + len(COMPONENTS) + 2 * cfg.is_two_stage, desc="build-engines", unit="stage",
                  disable=not cfg.progress)
    stages.set_postfix_str("reading checkpoint headers")
    src = plan_sources(get_preset(cfg.preset), cfg.checkpoint, cfg.seed, cfg.face_weights, cfg.text_encoder,
                       cfg.base, upsampler=cfg.upsampler, two_stage=cfg.is_two_stage)
    if scales_from_file(cfg, src):  # from the header, before any weight is read
        from stdrc.export.fp8_scaled import check_reusable_scales

        check_reusable_scales(src.checkpoint.fp8.quantization_metadata, src.checkpoint.path)
    estimate = check_disk(src, backend, cfg.precision, cfg.out, cfg.cache_dir)
    if estimate:
        log.info("engine weights, estimated from headers: %s", {k: f"{v / 2**30:.2f} GB" for k, v in estimate.items()})
    lora_set = None
    if cfg.loras:  # checked against the DiT's shapes from headers, then fused as each DiT tensor is read
        transform, lora_set = lora_transform(cfg.loras, src.preset.dit, cfg.dit_transform)
        if scales_from_file(cfg, src):  # onto the file's FP8 weights, requantised as ltx-core does
            quantized = frozenset(f"{n}.weight" for n in src.checkpoint.linear_scales("dit"))
            transform = Fp8LoraTransform(lora_set, quantized, cfg.dit_transform)
        cfg = replace(cfg, dit_transform=transform)
    refine = None
    if cfg.is_two_stage:  # the refinement LoRA (given, or the tiny presets' random one) checked from its header
        given = refine_lora_spec(cfg.refine_lora, src.preset, cfg.seed, cfg.cache_dir / "refine_lora")
        refine = load_refine_lora(given, src.preset.dit)
    models = load_sources(src, components=())  # preset, tokenizer, RoPE: no weights
    if lora_set:  # as load_models records it: a fused DiT is another source
        models.source_sha256 = hashlib.sha256((models.source_sha256 + lora_set.digest()).encode()).hexdigest()
    cache: list[ModelSet] = []

    def full() -> ModelSet:
        if not cache:
            cache.append(_fp32_models(src, cfg))
        return cache[0]

    stages.update()
    two_stage = cfg.is_two_stage
    specs = component_specs(models.preset, buckets, tiling, rope_input=rope == "input", two_stage=two_stage,
                            state_dtype=STATE_DTYPES[str(module_dtype(backend, cfg.precision))])
    with BundleWriter(cfg.out) as writer:
        quality = QualityConfig()
        if scales_from_file(cfg, src):
            stages.set_postfix_str("fp8 (the checkpoint's scales)")
            from stdrc.calibration.report import file_fp8_quality

            fp8_models = full()  # read before the scales: a LoRA's requantised ones are known then
            fp8 = file_fp8_quality(fp8_models, bucket, cfg.layout, writer.staging, checkpoint_fp8_scales(cfg, src),
                                   seed=cfg.seed)
            quality = QualityConfig(fp8=fp8)
        elif cfg.calibrate_fp8 or (cfg.precision == "fp8" and backend in TORCH_BACKENDS):
            stages.set_postfix_str("fp8 calibration")
            from stdrc.calibration.report import fp8_quality

            fp8 = fp8_quality(full(), bucket, cfg.layout, writer.staging, seed=cfg.seed)
            quality = QualityConfig(fp8=fp8)
        components = {}
        for name in COMPONENTS + (STAGE_COMPONENTS if two_stage else ()):
            stages.set_postfix_str(f"{name} ({backend})")
            if name == "dit_refine" and backend == "aoti":  # a package without constants: the dit's, the LoRA's
                components[name] = aoti_refine_component(cfg, src, bucket, specs, components["dit"], refine, writer)
            elif name == "dit_refine":  # the dit engine's graph with the LoRA's branches, on its weights file
                components[name] = refine_component(components["dit"], writer.staging, specs[name], refine,
                                                    dit_shapes(src.preset.dit), cfg.cache_dir / "trt_timing.cache")
            else:
                components[name] = build_component(cfg, backend, src, bucket, specs[name], writer, full)
            release_memory()
            log.info("built %s", name)
            if cfg.on_component is not None:
                cfg.on_component(name, writer.staging)
            stages.update()
        cache.clear()
        text = text_manifest(models, writer)
        if text.file is not None:  # the tokenizer makes text_gemma's token ids
            components["text_gemma"] = replace(
                components["text_gemma"],
                extra_files={**components["text_gemma"].extra_files, text.file: text.sha256})
        buckets, ratio = write_rope_tables(models, buckets, cfg.layout, writer, two_stage)
        if quality.fp8 is not None:
            extra_files = {quality.fp8.scales_file: quality.fp8.scales_sha256}
            components["dit"] = replace(components["dit"], extra_files={**components["dit"].extra_files,
                                                                         **extra_files})
        preset = models.preset
        model = ModelConfig.of_preset(preset, seed=cfg.seed)
        per = {b.label(): {k: activation_bytes(k, model, b, e.precision, tiling)
                           for k, e in components.items()} for b in buckets}
        memory = MemoryConfig(
            weight_bytes={k: component_weight_bytes(writer.staging, e.file, e.extra_files)
                          for k, e in components.items()},
            # the largest over the buckets (what the memory plan must hold); each bucket's below
            activation_bytes={k: max(per[b.label()][k] for b in buckets) for k in components},
            activation_bytes_per_bucket=per,
            note="weights: engine files' bytes; activations: estimates (stdrc.runtime.memory)",
        )
        manifest = assemble_manifest(
            preset, model, buckets, components, text, cfg.layout, rope_baked=rope == "baked",
            max_position_ratio=ratio,
            checkpoint_sha256=models.checkpoint_sha256,
            quality=quality,
            decode=tiling,
            memory=memory,
            created_by=CreatedBy(stdrc=stdrc.__version__, torch=torch.__version__, backend=backend,
                                 source_sha256=models.source_sha256, sources=models.sources,
                                 source_quantization=src.source_quantization(),
                                 versions=versions()),
            loras=lora_set.entries() if lora_set else (),
            two_stage=TwoStageConfig(lora=refine.entry()) if refine is not None else None,
        )
        stages.set_postfix_str("writing manifest")
        path = writer.commit(manifest)
        stages.update()
    stages.close()
    return path
