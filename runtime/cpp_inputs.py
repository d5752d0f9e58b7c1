"""Inputs for the C++ runner (`runtime/cpp`, `stdrc_run`), and the Python result on the same inputs.

The C++ runner samples and decodes; the text side and the reference encoding stay in Python.
`write_cpp_inputs` writes exactly what the runner reads (file names shared with
`runtime/cpp/include/stdrc/runner.h`), prepared by `Pipeline.prepare` and drawn with the same seeds
as `Pipeline.generate`, so `run_python(pipeline, folder)` == `Pipeline.generate(reference, options)`
== `stdrc_run --inputs folder`. Two stages (options.stages == 2, or a two-stage bundle's default): the
noise, reference and RoPE tables are the stage-1 half grid's, and the `stage2_` files the output
bucket's (the re-noise from seed + 2, the reference at the output size, the refinement's tables);
`inputs.json` records the stage count.
No torch import here: the Python side runs on whatever backend the bundle holds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stdrc.runtime import sampler as smp
from stdrc.runtime.errors import InputError
from stdrc.runtime.options import GenerationOptions
from stdrc.runtime.pipeline import UNGUIDED, Pipeline
from stdrc.runtime.video import frames_to_uint8

# inputs (runner.h `files::`)
NOISE, REFERENCE = "noise.npy", "reference_tokens.npy"
TEXT_CONTEXT, TEXT_MASK = "text_context.npy", "text_mask.npy"
NULL_CONTEXT, NULL_MASK = "null_context.npy", "null_mask.npy"
DECODE_NOISE, SIGMAS, INPUTS_JSON = "decode_noise.npy", "sigmas.npy", "inputs.json"
STAGE2 = "stage2_"  # two stages: the refinement's inputs at the output bucket, beside stage 1's
STAGE2_NOISE, STAGE2_REFERENCE = f"{STAGE2}noise.npy", f"{STAGE2}reference_tokens.npy"
# outputs
LATENT, VIDEO, FRAMES = "latent.npy", "video.npy", "frames.npy"
STAGE1_LATENT = "stage1_latent.npy"  # two stages: stage 1's tokens at the half grid


@dataclass(frozen=True)
class CppResult:
    """Final video tokens [1, N_video, C] f32, decoder video [1, 3, F, H, W] f32, frames [F, H, W, 3] u8."""

    latent: np.ndarray
    video: np.ndarray
    frames: np.ndarray
    stage1_latent: np.ndarray | None = None  # two stages: stage 1's tokens at the half grid


def write_cpp_inputs(pipeline: Pipeline, reference: str | Path | np.ndarray, options: GenerationOptions,
                     folder: str | Path) -> Path:
    """Write the runner's inputs for `pipeline.generate(reference, options)`; returns `folder`.

    Resolved by `Pipeline.prepare` like every generation (bucket, scales, sigmas, crop), so the runner
    samples exactly what `generate` would."""
    prepared = pipeline.prepare(reference, options)
    o, scales = prepared.options, prepared.scales
    two = o.stages == 2
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pipeline.bucket = prepared.bucket
    pipeline.prompts.fill([o.prompt, o.negative_prompt])  # the text engines open once for both
    text, no_text = pipeline.prompts(o.prompt), pipeline.prompts(o.negative_prompt)
    arrays = {  # the sampling grid's: the bucket, or its stage-1 half
        NOISE: pipeline.initial_noise(o.seed, prepared.bucket.half() if two else None),
        REFERENCE: pipeline.encode_reference(prepared.stage1_image if two else prepared.image),
        TEXT_CONTEXT: text[0], TEXT_MASK: text[1],
        NULL_CONTEXT: no_text[0], NULL_MASK: no_text[1],
        SIGMAS: prepared.sigmas,
    }
    arrays.update({f"{name}.npy": value for name, value in pipeline.rope_feeds(stage1=two).items()})
    if two:  # the refinement's, at the output bucket
        arrays.update({STAGE2_NOISE: pipeline.refine_noise(o.seed),
                       STAGE2_REFERENCE: pipeline.encode_reference(prepared.image)})
        arrays.update({f"{STAGE2}{name}.npy": value for name, value in pipeline.rope_feeds().items()})
    decode_noise = pipeline.decode_noise(o.seed)
    if decode_noise is not None:
        arrays[DECODE_NOISE] = decode_noise
    for name, value in arrays.items():
        want = np.int64 if name in (TEXT_MASK, NULL_MASK) else np.float32
        np.save(folder / name, np.ascontiguousarray(value, dtype=want))
    guidance = {"text_scale": float(scales.text), "ref_scale": float(scales.ref), "rescale": float(scales.rescale),
                "interval": None if scales.interval is None else [float(v) for v in scales.interval]}
    meta = {"format": 1, "bundle": str(pipeline.bundle_dir), "prompt": o.prompt, "negative_prompt": o.negative_prompt,
            "seed": o.seed, "guidance": guidance, "bucket": prepared.bucket.label(), "stages": o.stages,
            "options": o.to_json()}
    (folder / INPUTS_JSON).write_text(json.dumps(meta, indent=2) + "\n")
    return folder


def _scales(folder: Path) -> smp.GuidanceScales:
    g = json.loads((folder / INPUTS_JSON).read_text())["guidance"]
    interval = tuple(g["interval"]) if g.get("interval") is not None else None
    return smp.GuidanceScales(text=g["text_scale"], ref=g["ref_scale"], interval=interval,
                              rescale=g.get("rescale", 0.0))


def run_python(pipeline: Pipeline, folder: str | Path, max_batch: int = 3) -> CppResult:
    """The Python runtime's sampling loop and decode on exactly the inputs in `folder`."""
    folder = Path(folder)
    if not (folder / INPUTS_JSON).is_file():
        raise InputError(f"{folder} holds no {INPUTS_JSON}: write it with write_cpp_inputs")

    def load(name: str) -> np.ndarray:
        return np.load(folder / name)

    text, null = (load(TEXT_CONTEXT), load(TEXT_MASK)), (load(NULL_CONTEXT), load(NULL_MASK))
    cond = smp.Conditioning(load(REFERENCE), text, null)
    two = json.loads((folder / INPUTS_JSON).read_text()).get("stages") == 2
    latent = smp.sample(pipeline.denoiser_for("dit", stage1=two), load(NOISE), load(SIGMAS), cond, _scales(folder),
                        max_batch, feed_sigma=pipeline.feeds_sigma)
    stage1 = None
    if two:  # Pipeline.two_stage on the folder's arrays
        stage1 = latent
        refine = pipeline.manifest.components["dit_refine"]
        latent = smp.sample(pipeline.denoiser_for("dit_refine"), load(STAGE2_NOISE),
                            np.array(pipeline.manifest.two_stage.sigmas, np.float32),
                            smp.Conditioning(load(STAGE2_REFERENCE), text, null), UNGUIDED, max_batch,
                            feed_sigma=any(t.name == smp.SIGMA_INPUT for t in refine.inputs),
                            start=pipeline.upsample(stage1, pipeline.bucket.half()))
    timestep_conditioned = pipeline.manifest.model_config.vae.timestep_conditioning
    video = pipeline.decode_video(latent, load(DECODE_NOISE) if timestep_conditioned else None)
    return CppResult(latent, video.astype(np.float32), frames_to_uint8(video), stage1)


def read_cpp_outputs(folder: str | Path) -> CppResult:
    """What `stdrc_run --out folder` wrote."""
    folder = Path(folder)
    stage1 = np.load(folder / STAGE1_LATENT) if (folder / STAGE1_LATENT).is_file() else None
    return CppResult(np.load(folder / LATENT), np.load(folder / VIDEO), np.load(folder / FRAMES), stage1)
