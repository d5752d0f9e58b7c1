"""One spec per exported component: names, shapes, dynamic dims, sample inputs, tolerance.

Read by ONNX export, engine builds, `verify` and (through the manifest) the runtime.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from stdrc.export.config import Preset
from stdrc.runtime.manifest import SPACE_SCALE, Bucket, TensorSpec
from stdrc.runtime.tiling import DecodeTiling, decoder_tile_dims

FACE_BATCH = (1, 16, 64)
DIT_BATCH = (1, 3, 3)  # guidance streams: min, opt, max


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dynamic_dims: dict[str, list[int]] = field(default_factory=dict)
    sample: Callable[[int, int], dict[str, np.ndarray]] | None = None  # (batch, seed) -> feeds
    rel_l2_tolerance: float = 1e-4  # fp32 exported vs PyTorch

    def sample_inputs(self, seed: int = 0, batch: int | None = None) -> dict[str, np.ndarray]:
        opt = self.dynamic_dims.get("batch", [1, 1, 1])[1]
        return self.sample(batch or opt, seed)


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def component_specs(preset: Preset, bucket: Bucket, tiling: DecodeTiling | None = None) -> dict[str, ComponentSpec]:
    """With `tiling`, the VAE decoder takes the bucket's tile sizes (dynamic where they differ), run tile by tile."""
    d, b = preset.dit, bucket
    n, length, c = b.tokens, b.text_length, d.in_channels
    lf, lh, lw = b.latent_frames, b.latent_height, b.latent_width
    tile_dims = decoder_tile_dims(tiling, lh, lw) if tiling else {"tile_height": [lh] * 3, "tile_width": [lw] * 3}
    dec_dynamic = {k: v for k, v in tile_dims.items() if v[0] != v[2]}  # one tile length on an axis: static
    dh, dw = (name if name in dec_dynamic else tile_dims[name][2] for name in ("tile_height", "tile_width"))
    oh, ow = (f"{dim}*{SPACE_SCALE}" if isinstance(dim, str) else dim * SPACE_SCALE for dim in (dh, dw))
    latent_c = preset.vae.latent_channels

    def text_sample(batch: int, seed: int) -> dict[str, np.ndarray]:
        r = _rng(seed)
        valid = int(r.integers(1, length + 1))
        ids = np.zeros((1, length), np.int64)
        ids[0, length - valid:] = r.integers(3, preset.text.vocab_size, valid)
        ids[0, length - valid] = 1
        mask = (ids != 0).astype(np.int64)
        return {"token_ids": ids, "token_mask": mask}

    def dit_sample(batch: int, seed: int) -> dict[str, np.ndarray]:
        r = _rng(seed)
        sigma = r.uniform(0.05, 1.0, size=(batch, 1)).astype(np.float32)
        timestep = np.concatenate(
            [np.repeat(sigma, b.video_tokens, axis=1), np.zeros((batch, b.reference_tokens), np.float32)], axis=1
        )
        attn = np.ones((batch, n), np.int64)
        attn[0, b.video_tokens:] = 0  # first stream: "no reference"
        ctx_mask = np.ones((batch, length), np.int64)
        return {
            "latent": r.standard_normal((batch, n, c), dtype=np.float32),
            "timestep": timestep,
            "context": r.standard_normal((batch, length, d.caption_channels), dtype=np.float32),
            "context_mask": ctx_mask,
            "attn_mask": attn,
        }

    def enc_sample(batch: int, seed: int) -> dict[str, np.ndarray]:
        return {"image": _rng(seed).uniform(-1, 1, (1, 3, 1, b.height, b.width)).astype(np.float32)}

    def dec_sample(batch: int, seed: int) -> dict[str, np.ndarray]:
        r = _rng(seed)
        return {
            "latent": r.standard_normal((1, latent_c, lf, tile_dims["tile_height"][1], tile_dims["tile_width"][1]),
                                        dtype=np.float32),
            "timestep": np.full((1,), preset.vae.decode_timestep, np.float32),
        }

    def face_sample(batch: int, seed: int) -> dict[str, np.ndarray]:
        return {"image": _rng(seed).uniform(-1, 1, (batch, 3, 112, 112)).astype(np.float32)}

    f32, i64 = "float32", "int64"
    return {
        "text_encoder": ComponentSpec(
            "text_encoder",
            (TensorSpec("token_ids", (1, length), i64), TensorSpec("token_mask", (1, length), i64)),
            (TensorSpec("context", (1, length, d.caption_channels), f32), TensorSpec("context_mask", (1, length), i64)),
            sample=text_sample,
        ),
        "dit": ComponentSpec(
            "dit",
            (
                TensorSpec("latent", ("batch", n, c), f32),
                TensorSpec("timestep", ("batch", n), f32),
                TensorSpec("context", ("batch", length, d.caption_channels), f32),
                TensorSpec("context_mask", ("batch", length), i64),
                TensorSpec("attn_mask", ("batch", n), i64),
            ),
            (TensorSpec("velocity", ("batch", n, d.out_channels), f32),),
            dynamic_dims={"batch": list(DIT_BATCH)},
            sample=dit_sample,
        ),
        "vae_encoder": ComponentSpec(
            "vae_encoder",
            (TensorSpec("image", (1, 3, 1, b.height, b.width), f32),),
            (TensorSpec("latent", (1, latent_c, 1, lh, lw), f32),),
            sample=enc_sample,
        ),
        "vae_decoder": ComponentSpec(
            "vae_decoder",
            (TensorSpec("latent", (1, latent_c, lf, dh, dw), f32), TensorSpec("timestep", (1,), f32)),
            (TensorSpec("video", (1, 3, b.frames, oh, ow), f32),),
            dynamic_dims=dec_dynamic,
            sample=dec_sample,
        ),
        "face_encoder": ComponentSpec(
            "face_encoder",
            (TensorSpec("image", ("batch", 3, 112, 112), f32),),
            (TensorSpec("embedding", ("batch", 512), f32),),
            dynamic_dims={"batch": list(FACE_BATCH)},
            sample=face_sample,
        ),
    }
