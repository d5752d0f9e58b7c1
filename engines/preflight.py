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

from stdrc.export.config import get_preset
from stdrc.export.errors import CheckpointError, ExportError
from stdrc.runtime.errors import InputError
from stdrc.runtime.manifest import MANIFEST_NAME, Bucket
from stdrc.runtime.tiling import DecodeTiling, decode_tiling

if TYPE_CHECKING:
    from stdrc.engines.build import BuildConfig

# What each backend builds (the fast path's bf16/fp8 is the DiT's; its other components stay fp32).
BACKEND_PRECISIONS = {
    "onnxruntime": ("fp32", "fp16"),
    "tensorrt": ("fp32", "fp16", "bf16", "fp8"),
    "torch": ("fp32", "bf16", "fp8"),
    "aoti": ("fp32", "bf16", "fp8"),
}
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


def check_out(out: Path) -> None:
    """The output folder is new, empty, or a stdrc bundle (a build never replaces anything else)."""
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise InputError(f"--out {out} is a file: pass a folder path for the bundle")
        if any(out.iterdir()) and not (out / MANIFEST_NAME).is_file():
            raise InputError(f"--out {out} is a non-empty folder that is not a stdrc bundle: pass a new folder")
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"--out {out}: {parent} is a file, not a folder: pass a folder path for the bundle")


def check_bucket(cfg: BuildConfig) -> tuple[Bucket, DecodeTiling | None]:
    """The bucket (preset defaults filled in) and decode tiling, from plain values."""
    preset = get_preset(cfg.preset)
    d = preset.default_bucket
    for name in ("frames", "height", "width"):
        value = getattr(cfg, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise InputError(f"--{name} {value!r} must be a whole number")
    if cfg.fps is not None and not (math.isfinite(cfg.fps) and cfg.fps > 0):
        raise InputError(f"--fps {cfg.fps} must be a finite number > 0: e.g. --fps 24")
    frames = d["frames"] if cfg.frames is None else cfg.frames
    height = d["height"] if cfg.height is None else cfg.height
    width = d["width"] if cfg.width is None else cfg.width
    bucket = Bucket(frames=frames, height=height, width=width, text_length=preset.text.max_length,
                    fps=d["fps"] if cfg.fps is None else cfg.fps)
    return bucket, decode_tiling(bucket.height, bucket.width, cfg.decode_tile, cfg.decode_overlap)


def check_build(cfg: BuildConfig, backend: str) -> tuple[Bucket, DecodeTiling | None]:
    """Every argument check of a build; reads no weights (headers of files at most)."""
    get_preset(cfg.preset)
    check_precision(backend, cfg.precision)
    bucket, tiling = check_bucket(cfg)
    check_out(cfg.out)
    if cfg.base_checkpoint is not None and cfg.text_checkpoint is not None \
            and Path(cfg.base_checkpoint) != Path(cfg.text_checkpoint):
        raise InputError("--text-checkpoint is the old name of --base-checkpoint: pass one of them")
    if cfg.checkpoint is not None:
        check_safetensors_file(Path(cfg.checkpoint), "--checkpoint")
    base = cfg.base_checkpoint or cfg.text_checkpoint
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
    return bucket, tiling
