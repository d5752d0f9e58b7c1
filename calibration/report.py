"""FP8 quality figures for the manifest: capture DiT inputs through the PyTorch sampling pipeline,
calibrate with modelopt, then measure one-forward rel L2 and whole-generation frame PSNR.

Both figures are held out: measured on a generation (prompt, photo, seed) that calibration never saw.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from stdrc.calibration.data import CALIBRATION_PROMPTS, reference_photos
from stdrc.calibration.fp8 import amax_scales, fp8_dit_error, quantize_dit_fp8
from stdrc.export.errors import ExportError
from stdrc.export.models import ModelSet
from stdrc.runtime import sampler as smp
from stdrc.runtime.manifest import Bucket, sha256_file
from stdrc.runtime.schema import Fp8Quality
from stdrc.runtime.video import frames_to_uint8, psnr, resize_cover

log = logging.getLogger(__name__)
FP8_SCALES_FILE = "fp8_scales.json"  # bundle file: "{layer}.input_scale" / ".weight_scale" -> float
HELD_OUT_SEED = 10_000  # calibration generation i uses seed i


class TorchDenoiser:
    """A PyTorch DiT as the sampler's `Denoiser`; optionally records every batch it sees."""

    def __init__(self, dit: torch.nn.Module, cos: torch.Tensor, sin: torch.Tensor, record: bool = False):
        self.dit, self.cos, self.sin = dit, cos, sin
        self.recorded: list[dict[str, torch.Tensor]] = [] if record else None

    def __call__(self, latent, timestep, context, context_mask, attn_mask,
                 **sigma):
        feeds = {k: torch.from_numpy(v) for k, v in dict(latent=latent, timestep=timestep, context=context,
                                                         context_mask=context_mask, attn_mask=attn_mask,
                                                         **sigma).items()}
        feeds.update(rope_cos=self.cos, rope_sin=self.sin)
        if self.recorded is not None:
            self.recorded.append(feeds)
        with torch.no_grad():
            return self.dit(**feeds).numpy()


def _conditioning(models: ModelSet, bucket: Bucket, prompt: str, photo: np.ndarray) -> smp.Conditioning:
    def text(p: str) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            c, m = models.text(*map(torch.from_numpy, models.tokenize(p)))
        return c.numpy(), m.numpy()

    with torch.no_grad():
        image = resize_cover(photo, bucket.height, bucket.width)
        pixels = torch.from_numpy((image.astype(np.float32) / 127.5 - 1.0).transpose(2, 0, 1)[None, :, None].copy())
        ref = models.vae_encoder(pixels).flatten(2).transpose(1, 2).numpy()
    return smp.Conditioning(ref, text(prompt), text(""))


def _generate(models: ModelSet, bucket: Bucket, denoiser: TorchDenoiser, cond: smp.Conditioning, seed: int,
              steps: int) -> np.ndarray:
    noise = np.random.default_rng(seed).standard_normal((1, bucket.video_tokens, 128), dtype=np.float32)
    scales = smp.GuidanceScales(models.preset.text_scale, models.preset.ref_scale)
    tokens = smp.sample(denoiser, noise, smp.ltx2_sigmas(steps), cond, scales,
                        feed_sigma=models.preset.dit.takes_sigma)
    grid = (bucket.latent_frames, bucket.latent_height, bucket.latent_width)
    latent = torch.from_numpy(tokens.transpose(0, 2, 1).reshape(1, -1, *grid).copy())
    from stdrc.export.vae import DecoderForExport

    with torch.no_grad():
        video = DecoderForExport(models.vae_decoder)(latent, torch.tensor([models.preset.vae.decode_timestep]))
    return frames_to_uint8(video.numpy())


def calibrate_dit_fp8(models: ModelSet, bucket: Bucket, layout: str, calibration_prompts: int = 4
                      ) -> tuple[torch.nn.Module, list[dict[str, torch.Tensor]]]:
    """modelopt FP8 DiT calibrated on the inputs it sees while sampling calibration prompts and photos."""
    _, tables = models.rope(bucket, layout)
    photos = reference_photos()
    recorder = TorchDenoiser(models.dit, tables.cos, tables.sin, record=True)
    for i, prompt in enumerate(CALIBRATION_PROMPTS[:calibration_prompts]):
        cond = _conditioning(models, bucket, prompt, photos[i % len(photos)])
        _generate(models, bucket, recorder, cond, i, models.preset.steps)
    return quantize_dit_fp8(models.dit, recorder.recorded), recorder.recorded


def held_out_generation(models: ModelSet, bucket: Bucket, calibration_prompts: int, seed: int = 0
                        ) -> tuple[smp.Conditioning, int, str]:
    """Conditioning and seed of the generation FP8 is measured on: its prompt and seed are never calibrated on."""
    if not 1 <= calibration_prompts < len(CALIBRATION_PROMPTS):
        raise ExportError(f"calibration_prompts={calibration_prompts}: use 1..{len(CALIBRATION_PROMPTS) - 1} "
                          "(one prompt is kept back to measure FP8 on)")
    photo = calibration_prompts % len(reference_photos())
    cond = _conditioning(models, bucket, CALIBRATION_PROMPTS[-1], reference_photos()[photo])
    what = f"prompt {len(CALIBRATION_PROMPTS) - 1}, photo {photo}, seed {HELD_OUT_SEED + seed}"
    return cond, HELD_OUT_SEED + seed, what


def fp8_quality(models: ModelSet, bucket: Bucket, layout: str, out_dir: Path, seed: int = 0,
                calibration_prompts: int = 4) -> Fp8Quality:
    """Calibrate on inputs captured through the sampler, write `fp8_scales.json`, return the figures."""
    cond, eval_seed, what = held_out_generation(models, bucket, calibration_prompts, seed)  # validates first
    _, tables = models.rope(bucket, layout)
    steps = models.preset.steps
    qdit, captured = calibrate_dit_fp8(models, bucket, layout, calibration_prompts)
    reference = TorchDenoiser(models.dit, tables.cos, tables.sin, record=True)
    ref_frames = _generate(models, bucket, reference, cond, eval_seed, steps)
    fp8_frames = _generate(models, bucket, TorchDenoiser(qdit, tables.cos, tables.sin), cond, eval_seed, steps)
    held_out = reference.recorded  # the fp32 sampler's DiT inputs on the held-out generation
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
