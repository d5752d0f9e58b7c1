"""One spec per exported component: names, shapes, dynamic dims, sample inputs, tolerance.

Read by ONNX export, engine builds, `verify` and (through the manifest) the runtime.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from stdrc.export.config import Preset
from stdrc.runtime.manifest import SPACE_SCALE, Bucket, TensorSpec
from stdrc.runtime.sampler import SIGMA_INPUT  # the DiT's last input when DiTConfig.takes_sigma
from stdrc.runtime.tiling import DecodeTiling, decoder_tile_dims

FACE_BATCH = (1, 16, 64)
NUMPY_FLOATS = {"float32": np.float32, "float16": np.float16}
# the torch dtype a text_gemma engine's hidden states have (its export dtype; CastIO leaves them as they are)
STATE_DTYPES = {"torch.float32": "float32", "torch.float16": "float16", "torch.bfloat16": "bfloat16"}


def state_names(count: int) -> tuple[str, ...]:
    """The hidden states crossing from text_gemma to text_head: embeddings, then one a layer."""
    return tuple(f"hidden_state_{i}" for i in range(count))
DIT_BATCH = (1, 3, 3)  # guidance streams: min, opt, max


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dynamic_dims: dict[str, list[int]] = field(default_factory=dict)
    sample: Callable[[int, int], dict[str, np.ndarray]] | None = None  # (batch, seed) -> feeds
    # per bucket: the dynamic dims at that bucket's sizes (batch keeps its range), one TensorRT profile each
    bucket_dims: tuple[dict[str, list[int]], ...] = ()

    def sample_inputs(self, seed: int = 0, batch: int | None = None) -> dict[str, np.ndarray]:
        """Feeds in each input's dtype where numpy has it (bf16 inputs stay fp32 here: `torch_inputs`)."""
        opt = self.dynamic_dims.get("batch", [1, 1, 1])[1]
        feeds = self.sample(batch or opt, seed)
        return {k: v.astype(NUMPY_FLOATS[t.dtype]) if t.dtype in NUMPY_FLOATS else v
                for t in self.inputs for k, v in [(t.name, feeds[t.name])]}

    def torch_inputs(self, seed: int = 0, device: str = "cpu") -> tuple:
        """`sample_inputs` as torch tensors in each input's own dtype, in the spec's order (what an export traces)."""
        import torch

        feeds = self.sample_inputs(seed=seed)
        return tuple(torch.from_numpy(feeds[t.name]).to(device=device, dtype=getattr(torch, t.dtype))
                     for t in self.inputs)


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _span(values: Sequence[int]) -> list[int]:
    """[min, opt (the default bucket's), max] over the buckets."""
    return [min(values), values[0], max(values)]


def rope_shape(preset: Preset, tokens: int | str) -> tuple[int | str, ...]:
    """The shape of one bucket's cos/sin table (rope.py): interleaved (1, N, inner), split (1, heads, N, d/2)."""
    d = preset.dit
    if d.rope_type == "split":
        return (1, d.num_attention_heads, tokens, d.attention_head_dim // 2)
    return (1, tokens, d.inner_dim)


UPSAMPLER_DIMS = ("latent_frames", "latent_height", "latent_width")


def upsampler_spec(channels: int, grids: Sequence[tuple[int, int, int]]) -> ComponentSpec:
    """The `upsampler`: normalised stage-1 latent [1, C, F, h, w] -> `upsampled` [1, C, F, 2h, 2w].

    `grids`: the stage-1 latent grids (frames, height, width) it serves, the default first; a dim that
    differs between them is symbolic with [min, opt, max] and each grid is a TensorRT profile."""
    spans = {name: _span([g[i] for g in grids]) for i, name in enumerate(UPSAMPLER_DIMS)}
    varies = {k: v for k, v in spans.items() if v[0] != v[2]}
    f, h, w = (name if name in varies else spans[name][1] for name in UPSAMPLER_DIMS)
    oh, ow = (f"{d}*2" if isinstance(d, str) else d * 2 for d in (h, w))

    def sample(batch: int, seed: int) -> dict[str, np.ndarray]:
        return {"latent": _rng(seed).standard_normal((1, channels, *grids[0]), dtype=np.float32)}

    per = tuple({k: [g[UPSAMPLER_DIMS.index(k)]] * 3 for k in varies} for g in grids) if len(grids) > 1 else ()
    return ComponentSpec(
        "upsampler",
        (TensorSpec("latent", (1, channels, f, h, w), "float32"),),
        (TensorSpec("upsampled", (1, channels, f, oh, ow), "float32"),),
        dynamic_dims=varies, sample=sample, bucket_dims=per if varies else (),
    )


def component_specs(preset: Preset, buckets: Bucket | Sequence[Bucket], tiling: DecodeTiling | None = None,
                    rope_input: bool = False, two_stage: bool = False,
                    state_dtype: str = "float32") -> dict[str, ComponentSpec]:
    """Specs for every component, serving every bucket of `buckets` (the first is the default).

    A dim that differs between buckets is symbolic with [min, opt, max] over them (DiT tokens, VAE
    encoder height/width, decoder latent frames and tiles). `rope_input`: the DiT takes the RoPE
    tables as inputs `rope_cos`/`rope_sin` (else they are baked constants, one bucket). With
    `tiling`, the VAE decoder takes tile sizes (dynamic where they differ), run tile by tile.
    `two_stage`: the DiT and VAE encoder also serve each bucket's stage-1 half (`Bucket.half()`: a
    TensorRT profile per grid), and the specs gain the `upsampler` (half -> bucket latent) and
    `dit_refine` (the DiT's interface at the buckets' own grids). `state_dtype`: the hidden states' dtype
    between `text_gemma` and `text_head` (the text engines' export dtype: 16-bit in a 16-bit ONNX engine).
    """
    buckets = (buckets,) if isinstance(buckets, Bucket) else tuple(buckets)
    halves = tuple(x.half() for x in buckets) if two_stage else ()
    grids = buckets + halves  # what the DiT and the VAE encoder run at
    d, b = preset.dit, buckets[0]
    length, c = b.text_length, d.in_channels
    per_tile = [decoder_tile_dims(tiling, x.latent_height, x.latent_width) if tiling
                else {"tile_height": [x.latent_height] * 3, "tile_width": [x.latent_width] * 3} for x in buckets]
    tile_dims = {k: [min(t[k][0] for t in per_tile), per_tile[0][k][1], max(t[k][2] for t in per_tile)]
                 for k in ("tile_height", "tile_width")}
    spans = {"tokens": _span([x.tokens for x in grids]), "latent_frames": _span([x.latent_frames for x in buckets]),
             "height": _span([x.height for x in grids]), "width": _span([x.width for x in grids]), **tile_dims}
    varies = {k: v for k, v in spans.items() if v[0] != v[2]}  # one value over the buckets: static

    def dim(name: str, static: int) -> int | str:
        return name if name in varies else static

    n, lf = dim("tokens", b.tokens), dim("latent_frames", b.latent_frames)
    ih, iw = dim("height", b.height), dim("width", b.width)
    lh, lw = (f"{x}/{SPACE_SCALE}" if isinstance(x, str) else x // SPACE_SCALE for x in (ih, iw))
    dec_dynamic = {k: varies[k] for k in ("latent_frames", "tile_height", "tile_width") if k in varies}
    dh, dw = (name if name in dec_dynamic else tile_dims[name][2] for name in ("tile_height", "tile_width"))
    oh, ow = (f"{dim}*{SPACE_SCALE}" if isinstance(dim, str) else dim * SPACE_SCALE for dim in (dh, dw))
    frames_out = "frames" if isinstance(lf, str) else b.frames
    latent_c = preset.vae.latent_channels

    def text_sample(batch: int, seed: int) -> dict[str, np.ndarray]:
        r = _rng(seed)
        valid = int(r.integers(1, length + 1))
        ids = np.zeros((1, length), np.int64)
        ids[0, length - valid:] = r.integers(3, preset.text.vocab_size, valid)
        ids[0, length - valid] = 1
        mask = (ids != 0).astype(np.int64)
        return {"token_ids": ids, "token_mask": mask}

    states = state_names(preset.text.encoder_layers + 1)
    width = preset.text.encoder_dim

    def head_sample(batch: int, seed: int) -> dict[str, np.ndarray]:
        r = _rng(seed + 1)  # hidden states grow with depth, as Gemma's do
        shape = (1, length, width)
        return {"token_mask": text_sample(batch, seed)["token_mask"],
                **{n: (r.standard_normal(shape) * (1 + i)).astype(np.float32) for i, n in enumerate(states)}}

    def dit_sample(batch: int, seed: int) -> dict[str, np.ndarray]:
        r = _rng(seed)
        sigma = r.uniform(0.05, 1.0, size=(batch, 1)).astype(np.float32)
        timestep = np.concatenate(
            [np.repeat(sigma, b.video_tokens, axis=1), np.zeros((batch, b.reference_tokens), np.float32)], axis=1
        )
        attn = np.ones((batch, b.tokens), np.int64)
        attn[0, b.video_tokens:] = 0  # first stream: "no reference"
        ctx_mask = np.ones((batch, length), np.int64)
        feeds = {
            "latent": r.standard_normal((batch, b.tokens, c), dtype=np.float32),
            "timestep": timestep,
            "context": r.standard_normal((batch, length, d.context_dim), dtype=np.float32),
            "context_mask": ctx_mask,
            "attn_mask": attn,
        }
        if rope_input:  # tables of the right shape (verify feeds the bundle's own)
            angle = r.uniform(0, 2 * np.pi, rope_shape(preset, b.tokens))
            feeds.update(rope_cos=np.cos(angle).astype(np.float32), rope_sin=np.sin(angle).astype(np.float32))
        if d.takes_sigma:
            feeds[SIGMA_INPUT] = sigma[:, 0].copy()
        return feeds

    def enc_sample(batch: int, seed: int) -> dict[str, np.ndarray]:
        return {"image": _rng(seed).uniform(-1, 1, (1, 3, 1, b.height, b.width)).astype(np.float32)}

    def dec_sample(batch: int, seed: int) -> dict[str, np.ndarray]:
        r = _rng(seed)
        feeds = {"latent": r.standard_normal((1, latent_c, b.latent_frames, tile_dims["tile_height"][1],
                                              tile_dims["tile_width"][1]), dtype=np.float32)}
        if preset.vae.timestep_conditioning:
            feeds["timestep"] = np.full((1,), preset.vae.decode_timestep, np.float32)
        return feeds

    def face_sample(batch: int, seed: int) -> dict[str, np.ndarray]:
        return {"image": _rng(seed).uniform(-1, 1, (batch, 3, 112, 112)).astype(np.float32)}

    f32, i64 = "float32", "int64"
    rope = (TensorSpec("rope_cos", rope_shape(preset, n), f32), TensorSpec("rope_sin", rope_shape(preset, n), f32)) \
        if rope_input else ()
    dit_dims = {"batch": list(DIT_BATCH), **({"tokens": varies["tokens"]} if "tokens" in varies else {})}

    def profiles(dynamic: dict[str, list[int]], per: Callable[[int, Bucket], dict[str, list[int]]],
                 over: tuple[Bucket, ...] = buckets) -> tuple:
        """One dict per grid of `over`: its own [min, opt, max] of each dynamic dim (a TensorRT profile each)."""
        if len(over) == 1:
            return ()
        return tuple({k: per(i, x).get(k, span) for k, span in dynamic.items()} for i, x in enumerate(over))

    enc_dynamic = {k: varies[k] for k in ("height", "width") if k in varies}
    specs = {
        "text_gemma": ComponentSpec(
            "text_gemma",
            (TensorSpec("token_ids", (1, length), i64), TensorSpec("token_mask", (1, length), i64)),
            tuple(TensorSpec(n, (1, length, width), state_dtype) for n in states),
            sample=text_sample,
        ),
        "text_head": ComponentSpec(
            "text_head",
            (TensorSpec("token_mask", (1, length), i64),
             *(TensorSpec(n, (1, length, width), state_dtype) for n in states)),
            (TensorSpec("context", (1, length, preset.text.connector_dim), f32),
             TensorSpec("context_mask", (1, length), i64)),
            sample=head_sample,
        ),
        "dit": ComponentSpec(
            "dit",
            (
                TensorSpec("latent", ("batch", n, c), f32),
                TensorSpec("timestep", ("batch", n), f32),
                TensorSpec("context", ("batch", length, d.context_dim), f32),
                TensorSpec("context_mask", ("batch", length), i64),
                TensorSpec("attn_mask", ("batch", n), i64),
                *rope,
                *((TensorSpec(SIGMA_INPUT, ("batch",), f32),) if d.takes_sigma else ()),
            ),
            (TensorSpec("velocity", ("batch", n, d.out_channels), f32),),
            dynamic_dims=dit_dims,
            sample=dit_sample,
            bucket_dims=profiles(dit_dims, lambda i, x: {"tokens": [x.tokens] * 3}, grids),
        ),
        "vae_encoder": ComponentSpec(
            "vae_encoder",
            (TensorSpec("image", (1, 3, 1, ih, iw), f32),),
            (TensorSpec("latent", (1, latent_c, 1, lh, lw), f32),),
            dynamic_dims=enc_dynamic,
            sample=enc_sample,
            bucket_dims=profiles(enc_dynamic, lambda i, x: {"height": [x.height] * 3, "width": [x.width] * 3},
                                 grids),
        ),
        "vae_decoder": ComponentSpec(
            "vae_decoder",
            # a timestep only where the decoder is timestep-conditioned (LTX-2.3's is not)
            (TensorSpec("latent", (1, latent_c, lf, dh, dw), f32),
             *((TensorSpec("timestep", (1,), f32),) if preset.vae.timestep_conditioning else ())),
            (TensorSpec("video", (1, 3, frames_out, oh, ow), f32),),
            dynamic_dims=dec_dynamic,
            sample=dec_sample,
            # tiles of one bucket vary within its range: each profile spans that bucket's tiles
            bucket_dims=profiles(dec_dynamic, lambda i, x: {"latent_frames": [x.latent_frames] * 3, **per_tile[i]}),
        ),
        "face_encoder": ComponentSpec(
            "face_encoder",
            (TensorSpec("image", ("batch", 3, 112, 112), f32),),
            (TensorSpec("embedding", ("batch", 512), f32),),
            dynamic_dims={"batch": list(FACE_BATCH)},
            sample=face_sample,
        ),
    }
    if two_stage:
        specs.update(stage_specs(preset, buckets, specs["dit"]))
    return specs


def stage_specs(preset: Preset, buckets: tuple[Bucket, ...], dit: ComponentSpec) -> dict[str, ComponentSpec]:
    """The two-stage components: `upsampler` takes each bucket's stage-1 latent (half its latent height and
    width, normalised as the DiT makes it) and returns the bucket's; `dit_refine` has the DiT's inputs and
    outputs at the buckets' own grids (stage 2 runs one unguided stream at the output size)."""
    b = buckets[0]
    halves = [x.half() for x in buckets]
    tokens = _span([x.tokens for x in buckets])
    # the DiT's batch range (its graph, exported the same way), though stage 2 runs one stream
    refine_dims = {"batch": list(DIT_BATCH), **({"tokens": tokens} if tokens[0] != tokens[2] else {})}

    def refine_shape(shape: tuple[int | str, ...]) -> tuple[int | str, ...]:
        return tuple(b.tokens if dim == "tokens" and "tokens" not in refine_dims else dim for dim in shape)

    return {
        "upsampler": upsampler_spec(preset.vae.latent_channels,
                                    [(h.latent_frames, h.latent_height, h.latent_width) for h in halves]),
        "dit_refine": ComponentSpec(
            "dit_refine",
            tuple(TensorSpec(t.name, refine_shape(t.shape), t.dtype) for t in dit.inputs),
            tuple(TensorSpec(t.name, refine_shape(t.shape), t.dtype) for t in dit.outputs),
            dynamic_dims=refine_dims,
            sample=dit.sample,
            bucket_dims=tuple({**refine_dims, **({"tokens": [x.tokens] * 3} if "tokens" in refine_dims else {})}
                              for x in buckets) if len(buckets) > 1 else (),
        ),
    }
