"""LTX-2 rectified-flow sampling with decoupled text/reference guidance (DESIGN.md §1).

Written once for every backend: the DiT is injected as a `Denoiser` callable on numpy arrays.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from stdrc.runtime.errors import InputError

DISTILLED_SIGMAS = (1.0, 0.99375, 0.9875, 0.98125, 0.975, 0.909375, 0.725, 0.421875, 0.0)
BASE_SHIFT_ANCHOR, MAX_SHIFT_ANCHOR = 1024, 4096
MAX_SHIFT, BASE_SHIFT, TERMINAL = 2.05, 0.95, 0.1  # ltx-core LTX2Scheduler's defaults (builds write these)
SCHEDULE = {"kind": "ltx2", "max_shift": MAX_SHIFT, "base_shift": BASE_SHIFT, "terminal": TERMINAL,
            "shift_tokens": MAX_SHIFT_ANCHOR}  # ltx2_sigmas' defaults: a build's manifest sampler section

# The three guidance streams: (uses text, uses reference)
UNCOND, REF, FULL = "uncond", "ref", "full"
STREAMS = {UNCOND: (False, False), REF: (False, True), FULL: (True, True)}


@dataclass(frozen=True)
class GuidanceScales:
    """s_txt and s_ref of the three-stream formula; interval and rescale are optional knobs."""

    text: float = 3.0
    ref: float = 2.0
    interval: tuple[float, float] | None = None  # guide only while sigma_lo <= sigma <= sigma_hi
    rescale: float = 0.0  # CFG rescale phi in [0, 1]

    def streams(self, sigma: float | None = None) -> tuple[str, ...]:
        """Only the streams the scales need (s_ref = s_txt = 1: one; s_ref = 1: two)."""
        if sigma is not None and self.interval is not None:
            lo, hi = self.interval
            if not lo <= sigma <= hi:
                return (FULL,)
        if self.ref == 1.0 and self.text == 1.0:
            return (FULL,)
        if self.ref == 1.0:
            return (REF, FULL)
        return (UNCOND, REF, FULL)


def combine(denoised: dict[str, np.ndarray], scales: GuidanceScales) -> np.ndarray:
    """d = d_u + s_ref (d_r - d_u) + s_txt (d_f - d_r), using only the streams present."""
    full = denoised[FULL]
    if set(denoised) == {FULL}:
        return full
    ref = denoised[REF]
    uncond = denoised.get(UNCOND, ref)  # absent only when s_ref = 1, where its term cancels
    out = uncond + scales.ref * (ref - uncond) + scales.text * (full - ref)
    if scales.rescale > 0:
        factor = full.std() / max(float(out.std()), 1e-12)
        out = scales.rescale * (out * factor) + (1.0 - scales.rescale) * out
    return out.astype(np.float32)


def ltx2_sigmas(
    steps: int,
    tokens: int = MAX_SHIFT_ANCHOR,
    max_shift: float = MAX_SHIFT,
    base_shift: float = BASE_SHIFT,
    terminal: float | None = TERMINAL,
) -> np.ndarray:
    """ltx-core's `LTX2Scheduler` in numpy (float32 like it): shifted linspace, stretched to `terminal`."""
    if steps < 1:
        raise InputError(f"steps={steps}: use --steps 1 or more")
    sigmas = np.linspace(1.0, 0.0, steps + 1, dtype=np.float32)
    slope = (max_shift - base_shift) / (MAX_SHIFT_ANCHOR - BASE_SHIFT_ANCHOR)
    shift = tokens * slope + (base_shift - slope * BASE_SHIFT_ANCHOR)
    with np.errstate(divide="ignore"):
        # scalar / tensor the way torch evaluates it in float32 (times a reciprocal), to match bit for bit
        e = np.float32(math.exp(shift))
        shifted = e * np.reciprocal(e + (np.float32(1.0) / sigmas - np.float32(1.0)))
    sigmas = np.where(sigmas != 0, shifted, 0.0).astype(np.float32)
    nz = sigmas != 0
    one_minus = 1.0 - sigmas[nz]
    # one step leaves nothing to stretch (ltx-core divides 0 by ~0 there): keep the plain [1, 0]
    if terminal is not None and one_minus[-1] > 1e-6:
        sigmas[nz] = 1.0 - one_minus / (one_minus[-1] / (1.0 - terminal))
    return sigmas.astype(np.float32)


class Denoiser(Protocol):
    """Called with the feeds by name; `sigma` [B] only when sampled with `feed_sigma` (prompt-AdaLN DiTs)."""

    def __call__(
        self, latent: np.ndarray, timestep: np.ndarray, context: np.ndarray, context_mask: np.ndarray,
        attn_mask: np.ndarray, **sigma: np.ndarray,
    ) -> np.ndarray: ...


@dataclass(frozen=True)
class Conditioning:
    """What the streams are built from: video-token count and reference tokens [1, R, C]."""

    reference: np.ndarray
    text: tuple[np.ndarray, np.ndarray]  # context [1, L, D], mask [1, L]
    no_text: tuple[np.ndarray, np.ndarray]


STEP_INPUTS = ("latent", "timestep")  # what changes from step to step; the rest is fixed per stream set
FIXED_INPUTS = ("context", "context_mask", "attn_mask")
# The stream's global sigma [B] (fp32): a step input of DiTs with the prompt AdaLN (LTX-2.3's
# `cross_attention_adaln`), which modulates the text by it while reference tokens keep timestep 0.
SIGMA_INPUT = "sigma"


def _fixed_inputs(names: Sequence[str], video: int, cond: Conditioning) -> dict[str, np.ndarray]:
    """context, context_mask and attn_mask of a batch of streams: the same for every step."""
    ref = cond.reference.shape[1]
    parts: dict[str, list[np.ndarray]] = {k: [] for k in FIXED_INPUTS}
    for name in names:
        use_text, use_ref = STREAMS[name]
        context, mask = cond.text if use_text else cond.no_text
        attn = np.ones((1, video + ref), np.int64)
        if not use_ref:
            attn[:, video:] = 0
        for key, value in zip(FIXED_INPUTS, (context, mask, attn)):
            parts[key].append(value)
    return {k: np.concatenate(v, axis=0) for k, v in parts.items()}


def _stream_batch(names: Sequence[str], x: np.ndarray, sigma: float, cond: Conditioning,
                  fixed: dict[tuple[str, ...], dict[str, np.ndarray]] | None = None,
                  feed_sigma: bool = False) -> dict[str, np.ndarray]:
    """The DiT feeds of a batch of streams. With `fixed` (one dict per generation), the fixed inputs
    are built once per stream set and handed over as the same arrays at every step, so an engine
    can keep them bound (ONNX Runtime IO binding) and move only latent and timestep (and `sigma`,
    fed when `feed_sigma`)."""
    video, ref = x.shape[1], cond.reference.shape[1]
    key = tuple(names)
    if fixed is None or key not in fixed:
        built = _fixed_inputs(names, video, cond)
        if fixed is None:
            fixed = {}
        fixed[key] = built
    latent = np.concatenate([x, cond.reference], axis=1)
    timestep = np.concatenate([np.full((1, video), sigma, np.float32), np.zeros((1, ref), np.float32)], axis=1)
    batch = len(names)
    step = {"latent": np.concatenate([latent] * batch, axis=0) if batch > 1 else latent,
            "timestep": np.concatenate([timestep] * batch, axis=0) if batch > 1 else timestep}
    if feed_sigma:
        step[SIGMA_INPUT] = np.full((batch,), sigma, np.float32)
    return {**step, **fixed[key]}


def denoise_streams(
    denoiser: Denoiser, names: Sequence[str], x: np.ndarray, sigma: float, cond: Conditioning, max_batch: int,
    fixed: dict[tuple[str, ...], dict[str, np.ndarray]] | None = None, feed_sigma: bool = False,
) -> dict[str, np.ndarray]:
    """Denoised video tokens d = x - sigma * v per stream; streams batched, split by `max_batch`."""
    out: dict[str, np.ndarray] = {}
    for start in range(0, len(names), max_batch):
        chunk = list(names[start:start + max_batch])
        velocity = denoiser(**_stream_batch(chunk, x, sigma, cond, fixed, feed_sigma))
        for i, name in enumerate(chunk):
            v = velocity[i:i + 1, : x.shape[1]].astype(np.float32)
            out[name] = x - np.float32(sigma) * v
    return out


def sample(
    denoiser: Denoiser,
    noise: np.ndarray,
    sigmas: Sequence[float],
    cond: Conditioning,
    scales: GuidanceScales,
    max_batch: int = 3,
    on_step: Callable[[int], None] | None = None,
    feed_sigma: bool = False,
    start: np.ndarray | None = None,
) -> np.ndarray:
    """Euler on velocity over `sigmas`: x <- x + (sigma_next - sigma) * v, v from the guided d.

    `feed_sigma`: the DiT takes `sigma` (its spec lists SIGMA_INPUT). `start`: a clean latent to start from
    (two-stage refinement), noised to sigmas[0] as ltx-core's GaussianNoiser does:
    x = noise * s0 + start * (1 - s0); None: pure noise, x = noise * s0."""
    s0 = np.float32(sigmas[0])
    x = (noise * s0).astype(np.float32)
    if start is not None:
        if start.shape != noise.shape:
            raise ValueError(f"start latent {start.shape} and noise {noise.shape} differ")
        x = (x + start.astype(np.float32) * (np.float32(1.0) - s0)).astype(np.float32)
    fixed: dict[tuple[str, ...], dict[str, np.ndarray]] = {}  # per stream set, reused by every step
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        sigma, sigma_next = float(sigma), float(sigma_next)
        streams = scales.streams(sigma)
        d = combine(denoise_streams(denoiser, streams, x, sigma, cond, max_batch, fixed, feed_sigma), scales)
        velocity = (x - d) / np.float32(sigma)
        x = (x + np.float32(sigma_next - sigma) * velocity).astype(np.float32)
        if on_step is not None:
            on_step(i)
    return x
