"""The manifest facts that follow from a preset, its buckets and the RoPE layout, assembled in one place.

`build-engines` (engines/build.py) writes this manifest with the engines it built; calibration's
in-memory pipeline (calibration/report.py) runs the same one over PyTorch modules. It lives in export
because calibration may not import engines (tests/test_layering.py).
"""

from __future__ import annotations

from typing import Any

from stdrc.export.config import Preset
from stdrc.runtime.manifest import Bucket, ComponentEntry, Manifest
from stdrc.runtime.sampler import DISTILLED_SIGMAS, SCHEDULE
from stdrc.runtime.schema import GuidanceConfig, ModelConfig, ReferenceConfig, RopeConfig, SamplerConfig, TextConfig


def assemble_manifest(preset: Preset, model: ModelConfig, buckets: tuple[Bucket, ...],
                      components: dict[str, ComponentEntry], text: TextConfig, layout: str, *,
                      rope_baked: bool = True, max_position_ratio: float | None = None,
                      **sections: Any) -> Manifest:
    """Sampler schedule, guidance scales, RoPE (the first bucket's table file) and reference tokens from the
    preset and buckets; `sections`: what only a build knows (checkpoint_sha256, quality, decode, memory,
    created_by, loras, two_stage)."""
    bucket = buckets[0]
    return Manifest(
        preset=preset.name,
        model_config=model,
        checkpoint_sha256=sections.pop("checkpoint_sha256", None),
        buckets=buckets,
        components=components,
        sampler=SamplerConfig.build(preset.steps, DISTILLED_SIGMAS, **SCHEDULE),
        guidance=GuidanceConfig(text_scale=preset.text_scale, ref_scale=preset.ref_scale, null_reference="key_mask"),
        rope=RopeConfig(file=bucket.rope.file, sha256=bucket.rope.sha256, layout=layout, type=preset.dit.rope_type,
                        baked_in_dit=rope_baked, max_position_ratio=max_position_ratio),
        text=text,
        reference=ReferenceConfig(layout=layout, video_tokens=bucket.video_tokens,
                                  reference_tokens=bucket.reference_tokens, timestep=0.0),
        **sections,
    )
