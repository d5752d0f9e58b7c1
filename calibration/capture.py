"""DiT inputs for FP8 calibration, shaped like the runtime's guidance batches.

`random_dit_batches` needs no text encoder or VAE: seeded stand-ins for the clean latent, the
reference latent and the text features, noised at sigmas taken from the LTX-2 schedule. Each
batch holds the three guidance streams the sampler batches into one DiT call (DESIGN.md §1):
(no text, no ref), (no text, ref), (text, ref).
"""

from __future__ import annotations

import torch
from ltx_core.components.schedulers import LTX2Scheduler

from stdrc.export.config import Preset, get_preset
from stdrc.export.errors import ExportError
from stdrc.export.reference import reference_timesteps, token_positions
from stdrc.export.rope import rope_tables
from stdrc.export.specs import SIGMA_INPUT
from stdrc.runtime.manifest import Bucket

# (uses text, uses reference) per stream, in the sampler's order UNCOND, REF, FULL.
_STREAMS = ((False, False), (False, True), (True, True))


def schedule_sigmas(steps: int) -> torch.Tensor:
    """LTX-2's sigmas for `steps` (ltx-pipelines passes no latent: shift 2.05), terminal 0 dropped."""
    return LTX2Scheduler().execute(steps=steps)[:-1]


def _left_padded_mask(valid: int, length: int) -> torch.Tensor:
    mask = torch.zeros(length, dtype=torch.int64)
    mask[length - valid:] = 1
    return mask


def random_dit_batches(
    preset: Preset | str,
    bucket: Bucket,
    n: int,
    seed: int = 0,
    streams: int = 3,
    layout: str = "tass",
) -> list[dict[str, torch.Tensor]]:
    """`n` seeded DiT input dicts (STDRCTransformer keywords, RoPE tables included).

    Sigmas are spread evenly over the preset's schedule so calibration sees every noise level.
    `streams` < 3 keeps the last streams, as the sampler does when a guidance scale is 1.
    """
    preset = get_preset(preset) if isinstance(preset, str) else preset
    if n < 1 or not 1 <= streams <= len(_STREAMS):
        raise ExportError(f"random_dit_batches: n={n} must be >= 1 and streams={streams} in 1..3")
    d, b = preset.dit, bucket
    grid = (b.latent_frames, b.latent_height, b.latent_width)
    rope = rope_tables(token_positions(grid, layout, b.fps), d)
    sigmas = schedule_sigmas(preset.steps)
    picks = torch.linspace(0, len(sigmas) - 1, n).round().long()
    gen = torch.Generator().manual_seed(seed)
    length, video, ref = b.text_length, b.video_tokens, b.reference_tokens
    batches = []
    for sigma in sigmas[picks]:
        clean = torch.randn(video, d.in_channels, generator=gen)
        noise = torch.randn(video, d.in_channels, generator=gen)
        reference = torch.randn(ref, d.in_channels, generator=gen)  # clean: never noised
        latent = torch.cat([(1.0 - sigma) * clean + sigma * noise, reference])
        text = torch.randn(length, d.context_dim, generator=gen)
        null = torch.randn(length, d.context_dim, generator=gen)  # the empty prompt's features
        text_len = int(torch.randint(max(1, length // 2), length + 1, (1,), generator=gen))
        null_len = int(torch.randint(1, max(2, length // 4 + 1), (1,), generator=gen))
        contexts, context_masks, attn_masks = [], [], []
        for uses_text, uses_ref in _STREAMS[len(_STREAMS) - streams:]:
            contexts.append(text if uses_text else null)
            context_masks.append(_left_padded_mask(text_len if uses_text else null_len, length))
            attn = torch.ones(video + ref, dtype=torch.int64)
            if not uses_ref:
                attn[video:] = 0  # "no ref": reference keys masked out
            attn_masks.append(attn)
        batches.append({
            "latent": latent.expand(streams, -1, -1).contiguous(),
            "timestep": reference_timesteps(sigma.expand(streams), video, ref),
            "context": torch.stack(contexts),
            "context_mask": torch.stack(context_masks),
            "attn_mask": torch.stack(attn_masks),
            "rope_cos": rope.cos,
            "rope_sin": rope.sin,
            **({SIGMA_INPUT: sigma.expand(streams).contiguous()} if d.takes_sigma else {}),
        })
    return batches
