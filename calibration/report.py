"""FP8 quality figures for the manifest: capture DiT inputs through the runtime's `Pipeline` (with PyTorch
modules as its engines), calibrate with modelopt, then measure one-forward rel L2 and whole-generation
frame PSNR on that same pipeline (face crop, decode noise: what the runtime runs).

Both figures are held out: measured on a generation (prompt, photo, seed) that calibration never saw.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from stdrc.calibration.data import CALIBRATION_PROMPTS, reference_photos
from stdrc.calibration.fp8 import amax_scales, fp8_dit_error, quantize_dit_fp8
from stdrc.export.bundle_manifest import assemble_manifest
from stdrc.export.dit import BakedRopeDiT
from stdrc.export.errors import ExportError
from stdrc.export.fp8_scaled import scaled_fp8_dit
from stdrc.export.models import ModelSet
from stdrc.export.specs import component_specs
from stdrc.runtime.backends.torch import TorchEngine
from stdrc.runtime.manifest import Bucket, ComponentEntry, sha256_file
from stdrc.runtime.memory import EngineSet
from stdrc.runtime.pipeline import Pipeline
from stdrc.runtime.schema import (
    Fp8Quality,
    ModelConfig,
    TableFile,
    TextConfig,
)
from stdrc.runtime.video import psnr
from stdrc.runtime.vocab import REQUIRED_COMPONENTS

log = logging.getLogger(__name__)
FP8_SCALES_FILE = "fp8_scales.json"  # bundle file: "{layer}.input_scale" / ".weight_scale" -> float
HELD_OUT_SEED = 10_000  # calibration generation i uses seed i


class TorchDenoiser:
    """A PyTorch DiT as the sampler's `Denoiser` (for parity tests against the runtime's engines)."""

    def __init__(self, dit: torch.nn.Module, cos: torch.Tensor, sin: torch.Tensor):
        self.dit, self.cos, self.sin = dit, cos, sin

    def __call__(self, latent, timestep, context, context_mask, attn_mask, **sigma):
        feeds = {k: torch.from_numpy(v) for k, v in dict(latent=latent, timestep=timestep, context=context,
                                                         context_mask=context_mask, attn_mask=attn_mask,
                                                         **sigma).items()}
        with torch.no_grad():
            return self.dit(**feeds, rope_cos=self.cos, rope_sin=self.sin).numpy()


class RecordingEngine:
    """An engine that records every batch it runs as `dit(**batch)` keyword tensors (RoPE tables added)."""

    def __init__(self, engine: TorchEngine, cos: torch.Tensor, sin: torch.Tensor):
        self.engine, self.entry, self.rope = engine, engine.entry, {"rope_cos": cos, "rope_sin": sin}
        self.recorded: list[dict[str, torch.Tensor]] = []

    def run(self, feeds: dict[str, np.ndarray], keep=()) -> dict[str, np.ndarray]:
        self.recorded.append({**self.rope, **{k: torch.from_numpy(np.array(v)) for k, v in feeds.items()}})
        return self.engine.run(feeds)


def torch_pipeline(models: ModelSet, bucket: Bucket, layout: str, dit: torch.nn.Module | None = None,
                   record: bool = False) -> Pipeline:
    """The runtime's `Pipeline` (face crop, sampler, decode noise, tiling) over this process's PyTorch
    modules.

    Its manifest is made in memory from the preset (no bundle on disk; RoPE baked into the DiT). `dit`
    replaces the model's DiT (the FP8 one); `record`: `pipe.engines["dit"].recorded` holds its batches."""
    preset = models.preset
    _, tables = models.rope(bucket, layout)
    specs = component_specs(preset, bucket)
    entries = {name: ComponentEntry(backend="torch", file=f"{name}.pt2", sha256="0" * 64, precision="fp32",
                                    inputs=specs[name].inputs, outputs=specs[name].outputs,
                                    dynamic_dims=specs[name].dynamic_dims)
               for name in REQUIRED_COMPONENTS}
    modules = models.export_modules(bucket, layout)
    if dit is not None:
        modules["dit"] = BakedRopeDiT(dit, tables.cos, tables.sin).eval()
    # build-engines' manifest (export/bundle_manifest.py), with no file behind it: RoPE baked into the DiT
    # (no table file), the model's own tokenizer passed to the Pipeline below (no tokenizer file)
    no_file = replace(bucket, rope=TableFile(file="rope.npz", sha256="0" * 64))
    manifest = assemble_manifest(preset, ModelConfig.of_preset(preset), (no_file,), entries,
                                 TextConfig(tokenizer="bytes", max_length=preset.text.max_length), layout)

    def opener(name: str) -> TorchEngine | RecordingEngine:
        engine = TorchEngine(modules[name], entries[name])
        return RecordingEngine(engine, tables.cos, tables.sin) if record and name == "dit" else engine

    return Pipeline(Path("."), manifest, EngineSet(opener, list(entries), "all"), verify_hashes=False,
                    tokenizer=models.tokenize)


def _generate(pipe: Pipeline, photo: np.ndarray, prompt: str, seed: int) -> np.ndarray:
    return pipe.generate(photo, prompt=prompt, seed=seed).frames


def calibrate_dit_fp8(models: ModelSet, bucket: Bucket, layout: str, calibration_prompts: int = 4
                      ) -> tuple[torch.nn.Module, list[dict[str, torch.Tensor]]]:
    """modelopt FP8 DiT calibrated on the inputs it sees while the runtime's pipeline generates the
    calibration prompts and photos."""
    photos = reference_photos()
    pipe = torch_pipeline(models, bucket, layout, record=True)
    for i, prompt in enumerate(CALIBRATION_PROMPTS[:calibration_prompts]):
        _generate(pipe, photos[i % len(photos)], prompt, i)
    recorded = pipe.engines["dit"].recorded
    return quantize_dit_fp8(models.dit, recorded), recorded


def held_out_generation(calibration_prompts: int, seed: int = 0) -> tuple[np.ndarray, str, int, str]:
    """Photo, prompt and seed of the generation FP8 is measured on: prompt and seed never calibrated on."""
    if not 1 <= calibration_prompts < len(CALIBRATION_PROMPTS):
        raise ExportError(f"calibration_prompts={calibration_prompts}: use 1..{len(CALIBRATION_PROMPTS) - 1} "
                          "(one prompt is kept back to measure FP8 on)")
    photo = calibration_prompts % len(reference_photos())
    what = f"prompt {len(CALIBRATION_PROMPTS) - 1}, photo {photo}, seed {HELD_OUT_SEED + seed}"
    return reference_photos()[photo], CALIBRATION_PROMPTS[-1], HELD_OUT_SEED + seed, what


def fp8_quality(models: ModelSet, bucket: Bucket, layout: str, out_dir: Path, seed: int = 0,
                calibration_prompts: int = 4) -> Fp8Quality:
    """Calibrate on inputs captured through the sampler, write `fp8_scales.json`, return the figures."""
    photo, prompt, eval_seed, what = held_out_generation(calibration_prompts, seed)  # validates first
    qdit, captured = calibrate_dit_fp8(models, bucket, layout, calibration_prompts)
    reference = torch_pipeline(models, bucket, layout, record=True)
    ref_frames = _generate(reference, photo, prompt, eval_seed)
    fp8_frames = _generate(torch_pipeline(models, bucket, layout, dit=qdit), photo, prompt, eval_seed)
    held_out = reference.engines["dit"].recorded  # the fp32 DiT's inputs on the held-out generation
    scales_path = out_dir / FP8_SCALES_FILE
    scales_path.write_text(json.dumps(amax_scales(qdit), indent=1, sort_keys=True))
    result = Fp8Quality(
        method="nvidia-modelopt FP8 E4M3 per-tensor max, fake quantization on CPU",
        calibration_batches=len(captured),
        held_out=f"1 generation not in calibration ({what}): {len(held_out)} DiT batches",
        dit_rel_l2_held_out=fp8_dit_error(models.dit, qdit, held_out),
        frame_psnr_db_held_out=psnr(fp8_frames, ref_frames),
        scales_file=scales_path.name,
        scales_sha256=sha256_file(scales_path),
    )
    log.info("FP8 (held out): DiT rel L2 %.4f, frame PSNR %.1f dB", result.dit_rel_l2_held_out,
             result.frame_psnr_db_held_out)
    return result


def file_fp8_quality(models: ModelSet, bucket: Bucket, layout: str, out_dir: Path, scales: dict[str, float],
                     seed: int = 0) -> Fp8Quality:
    """A pre-quantized checkpoint's own scales (no calibration): written as `fp8_scales.json`, and what FP8
    costs on a held-out generation: ltx-core's fp8_scaled_mm arithmetic with those scales
    (`scaled_fp8_dit`, emulated on CPU) against the file's dequantised weights in fp32."""
    photo, prompt, eval_seed, what = held_out_generation(1, seed)
    fp8_dit = scaled_fp8_dit(models.dit, scales)
    reference = torch_pipeline(models, bucket, layout, record=True)
    ref_frames = _generate(reference, photo, prompt, eval_seed)
    fp8_frames = _generate(torch_pipeline(models, bucket, layout, dit=fp8_dit), photo, prompt, eval_seed)
    held_out = reference.engines["dit"].recorded
    scales_path = out_dir / FP8_SCALES_FILE
    scales_path.write_text(json.dumps(scales, indent=1, sort_keys=True))
    result = Fp8Quality(
        method="the checkpoint's own FP8 scales (E4M3 per tensor, static input scales), ltx-core's "
               "fp8_scaled_mm arithmetic emulated on CPU, against the file's dequantised weights in fp32",
        calibration_batches=0,
        held_out=f"1 generation ({what}): {len(held_out)} DiT batches",
        dit_rel_l2_held_out=fp8_dit_error(models.dit, fp8_dit, held_out),
        frame_psnr_db_held_out=psnr(fp8_frames, ref_frames),
        scales_file=scales_path.name,
        scales_sha256=sha256_file(scales_path),
        scales_source="checkpoint",
    )
    log.info("FP8 with the checkpoint's scales (held out): DiT rel L2 %.4f, frame PSNR %.1f dB",
             result.dit_rel_l2_held_out, result.frame_psnr_db_held_out)
    return result
