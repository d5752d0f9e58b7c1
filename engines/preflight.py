"""Argument checks of `build-engines`, all of them before any weight is read.

A wrong bucket, an impossible precision/backend pair, an output folder that is not a bundle
or a missing/non-safetensors file is one `error:` line in milliseconds, not after minutes of
loading a 13B-parameter checkpoint. The checkpoints' headers are opened afterwards by
`plan_sources` (keys and shapes only), which refuses a mix of real and seeded weights.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from stdrc.engines.bundle import check_out
from stdrc.export.config import get_preset
from stdrc.export.errors import CheckpointError, ExportError
from stdrc.runtime.errors import InputError
from stdrc.runtime.manifest import Bucket
from stdrc.runtime.tiling import DecodeTiling, decode_tiling
from stdrc.runtime.vocab import BACKEND_PRECISIONS, LAYOUTS, ONNX_BACKENDS, TORCH_BACKENDS

if TYPE_CHECKING:
    from stdrc.engines.build import BuildConfig
    from stdrc.export.models import Sources

def check_precision(backend: str, precision: str) -> None:
    allowed = BACKEND_PRECISIONS[backend]
    if precision not in allowed:
        others = [b for b, p in BACKEND_PRECISIONS.items() if precision in p]
        hint = (f"use --precision {' or '.join(allowed)}; {precision.upper()} needs --backend "
                f"{' or '.join(others)}")
        raise ExportError(f"--backend {backend} does not build --precision {precision} engines: {hint}")


def check_safetensors_file(path: Path, flag: str) -> None:
    """Exists, is a file, starts with a safetensors header (pickles are never read)."""
    from stdrc.export.checkpoint import _check_safetensors

    if not path.exists():
        raise CheckpointError(f"{flag} {path} does not exist: pass the path of a .safetensors file")
    if not path.is_file():
        raise CheckpointError(f"{flag} {path} is not a file: pass the path of a .safetensors file")
    _check_safetensors(path)


ROPE_MODES = ("auto", "input", "baked")


def parse_bucket(text: str) -> tuple[int, int, int]:
    """`--bucket FRAMESxWIDTHxHEIGHT` (e.g. 121x768x512) -> (frames, height, width)."""
    parts = str(text).lower().split("x")
    if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
        raise InputError(f"--bucket {text!r} is not FRAMESxWIDTHxHEIGHT: e.g. --bucket 121x768x512")
    frames, width, height = (int(p) for p in parts)
    return frames, height, width


def _whole(name: str, value: object, lo: int | None) -> None:
    """A whole number (>= lo when given; bucket sizes get the Bucket's own messages, with the nearest fix)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                              or (lo is not None and value < lo)):
        hint = " (or leave it out for the preset's default)" if name in ("frames", "height", "width") else ""
        raise InputError(f"--{name.replace('_', '-')} {value!r}: pass an integer{f' >= {lo}' if lo is not None else ''}"
                         f"{hint}")


def check_buckets(cfg: BuildConfig) -> tuple[tuple[Bucket, ...], DecodeTiling | None, str]:
    """The buckets (the first is the default), the decode tiling shared by all, and the RoPE mode
    (``baked``: tables as DiT constants, one bucket; ``input``: fed per bucket), from plain values."""
    preset = get_preset(cfg.preset)
    d = preset.default_bucket
    for name in ("frames", "height", "width"):
        _whole(name, getattr(cfg, name), None)
    for name in ("decode_tile", "decode_overlap", "seed"):
        _whole(name, getattr(cfg, name), 0)
    if cfg.fps is not None and (isinstance(cfg.fps, bool) or not isinstance(cfg.fps, (int, float))
                                or not math.isfinite(cfg.fps) or not 0 < cfg.fps <= 1000):
        raise InputError(f"--fps {cfg.fps} must be a finite number > 0 (at most 1000): e.g. --fps 24")
    fps = d["fps"] if cfg.fps is None else cfg.fps
    single = (cfg.frames, cfg.height, cfg.width)
    if cfg.buckets and any(v is not None for v in single):
        raise InputError("--bucket and --frames/--height/--width both give sizes: pass --bucket FxWxH for each "
                         "bucket, or --frames/--height/--width for one")
    sizes = [parse_bucket(b) if isinstance(b, str) else tuple(b) for b in cfg.buckets] or [
        tuple(d[k] if v is None else v for k, v in zip(("frames", "height", "width"), single))]
    buckets = []
    for frames, height, width in sizes:
        if (frames, height, width) in [(b.frames, b.height, b.width) for b in buckets]:
            raise InputError(f"--bucket {frames}x{width}x{height} is given twice: pass each size once")
        buckets.append(Bucket(frames=frames, height=height, width=width, text_length=preset.text.max_length,
                              fps=fps))
    if cfg.rope not in ROPE_MODES:
        raise InputError(f"--rope {cfg.rope!r}: choose one of {', '.join(ROPE_MODES)}")
    two_stage = check_two_stage(cfg, tuple(buckets))
    rope = cfg.rope if cfg.rope != "auto" else ("baked" if len(buckets) == 1 and not two_stage else "input")
    if rope == "baked" and two_stage:
        raise InputError("--rope baked holds one grid's tables as DiT constants, and a two-stage DiT runs two "
                         "(the half size, then the output size): pass --rope input (or auto)")
    if rope == "baked" and len(buckets) > 1:
        raise InputError(f"--rope baked holds one bucket's tables as DiT constants, and {len(buckets)} buckets "
                         "were given: pass --rope input (or auto), or one --bucket")
    height, width = max(b.height for b in buckets), max(b.width for b in buckets)
    return tuple(buckets), decode_tiling(height, width, cfg.decode_tile, cfg.decode_overlap), rope


def check_two_stage(cfg: BuildConfig, buckets: tuple[Bucket, ...]) -> bool:
    """Whether the build is two-stage; refuses one stage file without the other, `--two-stage` without the
    files outside the tiny presets, and a bucket whose half is not a VAE size (InputError, nothing read)."""
    given = {"--upsampler": cfg.upsampler, "--refine-lora": cfg.refine_lora}
    if sum(v is not None for v in given.values()) == 1:
        (have,) = (k for k, v in given.items() if v is not None)
        (lack,) = (k for k, v in given.items() if v is None)
        raise InputError(f"{have} without {lack}: a two-stage bundle needs both (the x2 latent upsampler and the "
                         f"refinement LoRA): pass {lack} FILE too, or neither")
    if not cfg.is_two_stage:
        return False
    if cfg.upsampler is None and get_preset(cfg.preset).text.kind != "tiny":
        raise InputError(f"--two-stage makes random stage pieces for the tiny presets only: for --preset "
                         f"{cfg.preset} pass --upsampler FILE and --refine-lora FILE[:STRENGTH]")
    for b in buckets:
        b.half()  # InputError naming the multiple of 64
    return True


# Backends that build the two-stage refinement engine (engines/refine.py, engines/aoti.py; docs/design.md says why
# not torch: its programs hold their weights, so a refinement program would hold a second copy).
REFINE_BACKENDS = (*ONNX_BACKENDS, "aoti")
# Backends whose VAE decoder goes through Inductor at build time.
INDUCTOR_BACKENDS = ("aoti",)
DECODER_DIMS = ("latent_frames", "tile_height", "tile_width")


def check_inductor_decoder(cfg: BuildConfig, buckets: tuple[Bucket, ...], tiling: DecodeTiling | None,
                           backend: str) -> None:
    """Inductor (torch 2.13) fails late, deep in lowering the decoder's reflect padding, when the decoder's
    latent frames, tile height and tile width are all dynamic: refuse that bucket mix up front."""
    from stdrc.export.specs import component_specs

    dynamic = component_specs(get_preset(cfg.preset), buckets, tiling)["vae_decoder"].dynamic_dims
    if all(k in dynamic for k in DECODER_DIMS):
        labels = " ".join(f"--bucket {b.frames}x{b.width}x{b.height}" for b in buckets)
        raise ExportError(f"--backend {backend} cannot compile one VAE decoder whose frames, height and "
                          f"width all differ between buckets ({labels}): give the buckets one frame count "
                          "or one height and width, or use --backend torch, onnxruntime or tensorrt")


def check_bucket(cfg: BuildConfig) -> tuple[Bucket, DecodeTiling | None]:
    """The default bucket (preset defaults filled in) and decode tiling."""
    buckets, tiling, _ = check_buckets(cfg)
    return buckets[0], tiling


def check_build(cfg: BuildConfig, backend: str) -> tuple[tuple[Bucket, ...], DecodeTiling | None, str]:
    """Every argument check of a build, in one place; reads no weights (headers of files at most)."""
    from stdrc.runtime.options import check_path

    get_preset(cfg.preset)
    check_precision(backend, cfg.precision)
    if cfg.layout not in LAYOUTS:
        raise ExportError(f"unknown layout {cfg.layout!r}: choose one of {', '.join(LAYOUTS)}")
    buckets, tiling, rope = check_buckets(cfg)
    baked_only = (backend in TORCH_BACKENDS and cfg.precision in ("bf16", "fp8")) \
        or (backend == "tensorrt" and cfg.precision == "fp8")
    if rope == "input" and baked_only:
        raise ExportError(f"--backend {backend} --precision {cfg.precision} bakes the RoPE tables into its DiT "
                          "(one bucket, one stage): pass one --bucket with --rope baked (or auto) and no "
                          f"two-stage flag, or --precision {'fp16 or bf16' if backend == 'tensorrt' else 'fp32'} "
                          "for several buckets or two stages")
    if cfg.is_two_stage and backend not in REFINE_BACKENDS:
        raise ExportError(f"--backend {backend} builds no refinement engine (dit_refine) for two-stage generation: "
                          f"pass --backend {' or '.join(REFINE_BACKENDS)}, or drop --two-stage, --upsampler and "
                          "--refine-lora for a one-stage bundle")
    if backend in INDUCTOR_BACKENDS:
        check_inductor_decoder(cfg, buckets, tiling, backend)
    for name in ("checkpoint", "base_checkpoint", "face_weights", "text_encoder", "cache_dir", "upsampler"):
        if getattr(cfg, name) is not None:
            check_path(getattr(cfg, name), f"--{name.replace('_', '-')}")
    if cfg.refine_lora is not None:
        check_path(cfg.refine_lora.path, "--refine-lora")
    check_out(check_path(cfg.out, "--out"))
    if cfg.checkpoint is not None:
        check_safetensors_file(Path(cfg.checkpoint), "--checkpoint")
    if cfg.upsampler is not None:
        check_safetensors_file(Path(cfg.upsampler), "--upsampler")
    if cfg.refine_lora is not None:
        check_safetensors_file(Path(cfg.refine_lora.path), "--refine-lora")
    base = cfg.base_checkpoint
    if base is not None:
        check_safetensors_file(Path(base), "--base-checkpoint")
        if cfg.checkpoint is None:
            raise InputError("--base-checkpoint supplies the VAE and text side beside a DiT-only --checkpoint: "
                             "pass that --checkpoint too")
    if cfg.face_weights is not None and not Path(cfg.face_weights).is_file():
        raise CheckpointError(f"--face-weights {cfg.face_weights} does not exist: pass the arcface_torch "
                              "backbone.pth (iresnet50)")
    if cfg.text_encoder is not None:
        folder = Path(cfg.text_encoder)
        if not folder.is_dir():
            raise CheckpointError(f"--text-encoder {folder} is not a folder: pass a local Gemma-3 folder "
                                  "(config.json, *.safetensors, tokenizer.json)")
        for shard in sorted(folder.glob("*.safetensors")):
            check_safetensors_file(shard, "--text-encoder shard")
    elif get_preset(cfg.preset).text.kind != "tiny":
        raise CheckpointError(f"--preset {cfg.preset} uses the Gemma-3 text side: pass --text-encoder DIR "
                              "(a local Gemma-3 folder)")
    return buckets, tiling, rope


# Unestimated bytes a build may also write: the seeded face encoder (iresnet50: 0.17 GB fp32), manifest,
# RoPE tables, tokenizer, small stage-cache entries.
DISK_MARGIN_BYTES = 512 * 1024**2


def engine_itemsize(backend: str, precision: str, component: str) -> int:
    """Bytes per weight element in `component`'s engine (the torch fast path lowers only the DiT)."""
    if backend in ONNX_BACKENDS:
        return {"fp32": 4, "fp8": 1 if component == "dit" else 2}.get(precision, 2)
    return {"bf16": 2, "fp8": 1}.get(precision, 4) if component == "dit" else 4


def _gemma_elements(folder: Path) -> int:
    """Weight elements of a Gemma folder's language model, from shard headers (the vision tower and the tied
    LM head are not exported)."""
    from safetensors import safe_open

    total = 0
    for shard in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(shard), framework="np") as f:
            total += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys()
                         if not any(part in k for part in ("vision_tower", "multi_modal_projector", "lm_head")))
    return total


def engine_bytes_estimate(src: Sources, backend: str, precision: str) -> dict[str, int]:
    """Engine weight bytes per component whose weights come from files, from their headers (no weight read)."""
    elements: dict[str, int] = {}
    for name, ckpt in (("dit", src.checkpoint), ("vae_encoder", src.vae), ("vae_decoder", src.vae)):
        if ckpt is not None and ckpt.has(name):
            elements[name] = sum(math.prod(ckpt.shapes[k]) for k in ckpt.keys[name].values())
    if src.text is not None:
        elements["text_head"] = sum(math.prod(src.text.shapes[k]) for k in src.text.keys["text"].values())
    if src.gemma is not None:
        elements["text_gemma"] = _gemma_elements(src.gemma.folder)
    if src.upsampler is not None:
        elements["upsampler"] = sum(math.prod(shape) for shape in src.upsampler.checkpoint.shapes.values())
    return {k: n * engine_itemsize(backend, precision, k) for k, n in elements.items()}


def _existing(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return path


def disk_needs(estimate: dict[str, int], backend: str, out: Path, cache_dir: Path) -> dict[Path, int]:
    """Free bytes each disk must have: the bundle beside `out`, plus (ONNX backends) the largest component's
    exported ONNX, which lies in the stage cache until its engine is written. One entry when both are one disk."""
    bundle, largest = sum(estimate.values()), max(estimate.values(), default=0)
    transient = largest if backend in ONNX_BACKENDS else 0
    out_disk, cache_disk = _existing(Path(out).parent), _existing(cache_dir)
    if out_disk.stat().st_dev == cache_disk.stat().st_dev:
        return {out_disk: bundle + transient + DISK_MARGIN_BYTES}
    return {out_disk: bundle + DISK_MARGIN_BYTES, cache_disk: transient + DISK_MARGIN_BYTES}


def check_disk_space(needs: dict[Path, int], free: dict[Path, int]) -> None:
    """Refuse a build its disks cannot hold, before any weight is read (not a failed write minutes later)."""
    for disk, need in needs.items():
        if free[disk] < need:
            raise InputError(f"the build needs about {need / 2**30:.1f} GB free on the disk of {disk} "
                             f"(engines + the largest export while it builds), {free[disk] / 2**30:.1f} GB is "
                             "free: free space, or pass --out and --cache-dir on a larger disk")


def check_disk(src: Sources, backend: str, precision: str, out: Path, cache_dir: Path) -> dict[str, int]:
    """The build's disk needs against what is free now; returns the per-component estimate (for the log)."""
    import shutil

    estimate = engine_bytes_estimate(src, backend, precision)
    needs = disk_needs(estimate, backend, out, cache_dir)
    check_disk_space(needs, {disk: shutil.disk_usage(disk).free for disk in needs})
    return estimate
