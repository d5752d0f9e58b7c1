"""Model configs and presets by name. Differences between models live here, not in code branches."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from typing import Any

from stdrc.runtime.errors import InputError


class ModelFamily(str, Enum):
    """The model a checkpoint or preset is (export/family.py decides it for a file). ltx-core has no
    version switch: a family is a consistent set of the config flags below, which the exporters read."""

    LTX2 = "ltx2"
    LTX23 = "ltx2.3"

    @property
    def label(self) -> str:
        return {"ltx2": "LTX-2", "ltx2.3": "LTX-2.3"}[self.value]

    @property
    def defaults(self) -> FamilyDefaults:
        return FAMILY_DEFAULTS[self]


@dataclass(frozen=True)
class FamilyDefaults:
    """ltx-pipelines' stage-1 sampling defaults of a family (LTX23.md 2): what a bundle records in its
    manifest when its preset does not set them."""

    steps: int
    text_scale: float  # the video CFG scale


FAMILY_DEFAULTS = {
    ModelFamily.LTX2: FamilyDefaults(steps=40, text_scale=3.0),
    ModelFamily.LTX23: FamilyDefaults(steps=30, text_scale=3.0),
}


@dataclass(frozen=True)
class DiTConfig:
    """LTX-2 / LTX-2.3 video-only transformer hyper-parameters (ltx-core's `transformer` config keys).

    The 2.3 arithmetic follows from the flags, as in ltx-core: `apply_gated_attention` (per-head gates),
    `cross_attention_adaln` (9-slot AdaLN + prompt AdaLN fed by the stream's sigma), and
    `caption_proj_before_connector` (no caption projection in the DiT: context arrives `inner_dim` wide).
    """

    num_layers: int = 48
    num_attention_heads: int = 32
    attention_head_dim: int = 128
    in_channels: int = 128
    out_channels: int = 128
    cross_attention_dim: int = 4096
    caption_channels: int = 3840
    norm_eps: float = 1e-6
    positional_embedding_theta: float = 10000.0
    positional_embedding_max_pos: tuple[int, int, int] = (20, 2048, 2048)
    timestep_scale_multiplier: int = 1000
    rope_type: str = "interleaved"  # or "split"
    frequencies_precision: str = "float32"  # or "float64"
    apply_gated_attention: bool = False
    cross_attention_adaln: bool = False
    caption_proj_before_connector: bool = False

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def takes_sigma(self) -> bool:
        """The DiT takes the stream's sigma: ltx-core builds `prompt_adaln_single` exactly with this flag."""
        return self.cross_attention_adaln

    @property
    def context_dim(self) -> int:
        """Width of the text context the DiT takes: `caption_channels` before its caption projection, or
        `inner_dim` when the projection ran on the text side (2.3's config still says 3840 there)."""
        return self.inner_dim if self.caption_proj_before_connector else self.caption_channels

    def ltx_config(self) -> dict[str, Any]:
        """The dict ltx-core's `LTXVideoOnlyModelConfigurator.from_config` reads."""
        t = {k: v for k, v in asdict(self).items()}
        t["positional_embedding_max_pos"] = list(self.positional_embedding_max_pos)
        t.update(
            dropout=0.0, attention_bias=True, num_vector_embeds=None, activation_fn="gelu-approximate",
            num_embeds_ada_norm=1000, use_linear_projection=False, only_cross_attention=False,
            cross_attention_norm=True, double_self_attention=False, upcast_attention=False,
            standardization_norm="rms_norm", norm_elementwise_affine=False, qk_norm="rms_norm",
            positional_embedding_type="rope", use_middle_indices_grid=True, attention_type="pytorch",
        )
        return {"transformer": t}


@dataclass(frozen=True)
class VAEConfig:
    """The LTX video VAE (ltx-core's `vae` config keys). Real block lists come from checkpoint metadata.

    Defaults are what ltx-core's video_vae configurators take for a key a file's `vae` section lacks
    (`export/vae.py` `vae_from_metadata`): one `spatial_padding_mode` sets both sides, absent it the
    encoder pads with zeros and the decoder reflects; an absent `timestep_conditioning` is true.
    `decode_timestep` and `decode_noise_scale` are ltx-core's decoder constants, not config keys."""

    latent_channels: int = 128
    patch_size: int = 4
    norm_layer: str = "pixel_norm"
    latent_log_var: str = "uniform"
    encoder_blocks: tuple[tuple[str, Any], ...] = ()
    decoder_blocks: tuple[tuple[str, Any], ...] = ()
    decoder_base_channels: int = 128
    causal_decoder: bool = False
    timestep_conditioning: bool = True
    encoder_spatial_padding_mode: str = "zeros"
    decoder_spatial_padding_mode: str = "reflect"
    decode_timestep: float = 0.05
    decode_noise_scale: float = 0.025

    def ltx_config(self, which: str) -> dict[str, Any]:
        blocks = self.encoder_blocks if which == "encoder" else self.decoder_blocks
        vae = {
            "dims": 3,
            "in_channels": 3,
            "out_channels": 3,
            "latent_channels": self.latent_channels,
            "patch_size": self.patch_size,
            "norm_layer": self.norm_layer,
            "latent_log_var": self.latent_log_var,
            "encoder_blocks" if which == "encoder" else "decoder_blocks": [list(b) for b in blocks],
            "decoder_base_channels": self.decoder_base_channels,
            "causal_decoder": self.causal_decoder,
            "timestep_conditioning": self.timestep_conditioning,
            "spatial_padding_mode": (
                self.encoder_spatial_padding_mode if which == "encoder" else self.decoder_spatial_padding_mode
            ),
        }
        return {"vae": vae}


def _blocks(names: tuple[str, ...], layers: tuple[int, ...], multipliers: tuple[int, ...],
            **extra: Any) -> tuple[tuple[str, Any], ...]:
    """res_x, compression, res_x, ... in a file's order (the decoder's listed pixel side first; ltx-core
    reverses it at build)."""
    out: list[tuple[str, Any]] = []
    for n, name, m in zip(layers, names, multipliers):
        out += [("res_x", {"num_layers": n}), (name, {"multiplier": m, **extra})]
    return (*out, ("res_x", {"num_layers": layers[-1]}))


# LTX-2.3's video VAE (LTX23.md 1c, 3P until a real header confirms it; a file's own `vae` section rules):
# wider compressions, no timestep conditioning (no decode timestep or noise), zeros padding on both sides.
LTX23_ENCODER_KINDS = ("compress_space_res", "compress_time_res", "compress_all_res", "compress_all_res")
LTX23_DECODER_KINDS = ("compress_space", "compress_time", "compress_all", "compress_all")
LTX23_DECODER_MULTIPLIERS = (2, 2, 1, 2)
LTX23_VAE = VAEConfig(
    encoder_blocks=_blocks(LTX23_ENCODER_KINDS, (4, 6, 4, 2, 2), (2, 2, 2, 1)),
    decoder_blocks=_blocks(LTX23_DECODER_KINDS, (4, 6, 4, 2, 2), LTX23_DECODER_MULTIPLIERS),
    timestep_conditioning=False,
    encoder_spatial_padding_mode="zeros",
    decoder_spatial_padding_mode="zeros",
)


@dataclass(frozen=True)
class TextConfig:
    """The text side: encoder features -> projection -> LTX-2's connector -> context of `connector_dim`.

    kind "tiny": seeded byte-level encoder, no download. kind "gemma": Gemma-3 from a local folder,
    whose own config then sets `vocab_size`, `encoder_dim`, `encoder_layers`, `encoder_heads` and `encoder_ffn`.
    The connector fields are ltx-core's `connector_*` transformer config keys (checkpoint metadata overrides them).
    """

    kind: str = "gemma"
    max_length: int = 1024
    vocab_size: int = 262208  # tiny: 256 bytes + pad + bos + eos
    encoder_dim: int = 3840
    encoder_layers: int = 48
    encoder_heads: int = 16  # attention heads and feed-forward width: the activation estimate's (runtime/memory.py)
    encoder_ffn: int = 15360
    connector_heads: int = 30
    connector_head_dim: int = 128
    connector_layers: int = 2
    connector_registers: int = 128
    connector_max_pos: tuple[int, ...] = (1,)
    connector_gated_attention: bool = False
    rope_type: str = "interleaved"
    frequencies_precision: str = "float32"
    # LTX-2.3 (ltx-core's FeatureExtractorV2, set by the V2 caption keys of the metadata): per-token RMS norm
    # and a biased `video_aggregate_embed` straight to the connector's width, no caption projection in the DiT
    per_token_projection: bool = False

    @property
    def connector_dim(self) -> int:
        """The context's width: the connector's (V1: the encoder's too; V2: the DiT's heads x head_dim)."""
        return self.connector_heads * self.connector_head_dim


@dataclass(frozen=True)
class Preset:
    name: str
    dit: DiTConfig
    vae: VAEConfig
    text: TextConfig
    default_bucket: dict[str, Any] = field(default_factory=dict)
    preset_steps: int | None = None  # None: the family's (a checkpoint's metadata may change the family)
    preset_text_scale: float | None = None
    ref_scale: float = 2.0

    @property
    def steps(self) -> int:
        return self.preset_steps or self.family.defaults.steps

    @property
    def text_scale(self) -> float:
        return self.family.defaults.text_scale if self.preset_text_scale is None else self.preset_text_scale

    @property
    def family(self) -> ModelFamily:
        """LTX-2.3 when any of its flags is set (a checkpoint's are all set or none: export/family.py)."""
        dit = self.dit
        flags = (dit.apply_gated_attention, dit.cross_attention_adaln, dit.caption_proj_before_connector,
                 self.text.per_token_projection)
        return ModelFamily.LTX23 if any(flags) else ModelFamily.LTX2

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def with_dit(self, **changes: Any) -> Preset:
        return replace(self, dit=replace(self.dit, **changes))


def _tiny() -> Preset:
    return Preset(
        name="tiny",
        dit=DiTConfig(
            num_layers=2, num_attention_heads=2, attention_head_dim=32, cross_attention_dim=64,
            caption_channels=32,
        ),
        vae=VAEConfig(
            encoder_blocks=(("res_x", {"num_layers": 1}), ("compress_all", {}), ("compress_all", {}),
                            ("compress_all", {})),
            decoder_blocks=(("res_x", {"num_layers": 1}), ("compress_all", {"multiplier": 2}),
                            ("compress_all", {"multiplier": 2}), ("compress_all", {"multiplier": 2})),
            decoder_base_channels=16,
            timestep_conditioning=True,
        ),
        text=TextConfig(
            kind="tiny", max_length=16, vocab_size=259, encoder_dim=32, encoder_layers=2, encoder_heads=1,
            encoder_ffn=32, connector_heads=2,
            connector_head_dim=16, connector_layers=1, connector_registers=16,
        ),
        default_bucket={"frames": 9, "height": 64, "width": 96, "text_length": 16, "fps": 24.0},
        preset_steps=8,
    )


def _tiny23() -> Preset:
    """`tiny` with LTX-2.3's flags (gated attention, 9-slot + prompt AdaLN, context `inner_dim` wide, the
    per-token text projection), a gated connector as wide as that context, and LTX23_VAE's kind of VAE
    (its block kinds and multipliers, zeros padding, a decoder without timestep conditioning: no decode
    timestep or noise) at tiny size: one layer per res_x, the encoder 128 channels throughout, decoder base
    16. The 2.3 path in seconds. Its steps are the family's (30), as a real 2.3 bundle's."""
    tiny = _tiny()
    return replace(
        tiny, name="tiny23", preset_steps=None,
        dit=replace(tiny.dit, apply_gated_attention=True, cross_attention_adaln=True,
                    caption_proj_before_connector=True),
        vae=replace(LTX23_VAE, decoder_base_channels=16,
                    encoder_blocks=_blocks(LTX23_ENCODER_KINDS, (1,) * 5, (1,) * 4),
                    decoder_blocks=_blocks(LTX23_DECODER_KINDS, (1,) * 5, LTX23_DECODER_MULTIPLIERS)),
        text=replace(tiny.text, encoder_dim=64, encoder_ffn=64, connector_head_dim=32,
                     connector_gated_attention=True, per_token_projection=True),
    )


def _ltx2_video() -> Preset:
    """LTX-2's video stream at full size: ltx-core's LTXModel defaults (48 x 32 heads x 128, text 4096)."""
    return Preset(
        name="ltx2-video",
        dit=DiTConfig(),
        vae=VAEConfig(
            # LTX-2 video VAE layout; a checkpoint's own metadata overrides it when loaded.
            encoder_blocks=(("res_x", {"num_layers": 4}), ("compress_space_res", {"multiplier": 2}),
                            ("res_x", {"num_layers": 6}), ("compress_time_res", {"multiplier": 2}),
                            ("res_x", {"num_layers": 6}), ("compress_all_res", {"multiplier": 2}),
                            ("res_x", {"num_layers": 2}), ("compress_all_res", {"multiplier": 2}),
                            ("res_x", {"num_layers": 2})),
            decoder_blocks=(("res_x", {"num_layers": 5, "inject_noise": False}),
                            ("compress_all", {"residual": True, "multiplier": 2}),
                            ("res_x", {"num_layers": 5, "inject_noise": False}),
                            ("compress_all", {"residual": True, "multiplier": 2}),
                            ("res_x", {"num_layers": 5, "inject_noise": False}),
                            ("compress_all", {"residual": True, "multiplier": 2}),
                            ("res_x", {"num_layers": 5, "inject_noise": False})),
            timestep_conditioning=False,
        ),
        text=TextConfig(),
        default_bucket={"frames": 121, "height": 512, "width": 768, "text_length": 1024, "fps": 24.0},
    )


def _ltx23_video() -> Preset:
    """LTX-2.3's video stream at full size (LTX23.md 1, 3P values until a real header confirms them; a file's
    `config` metadata rules): the 2.3 DiT flags, split fp64 RoPE, the V2 text side into an 8-layer gated
    32 x 128 connector with registers, LTX23_VAE."""
    ltx2 = _ltx2_video()
    return replace(
        ltx2, name="ltx23-video",
        dit=replace(ltx2.dit, apply_gated_attention=True, cross_attention_adaln=True,
                    caption_proj_before_connector=True, rope_type="split", frequencies_precision="float64"),
        vae=LTX23_VAE,
        text=replace(ltx2.text, connector_heads=32, connector_head_dim=128, connector_layers=8,
                     connector_registers=128, connector_max_pos=(4096,), connector_gated_attention=True,
                     rope_type="split", frequencies_precision="float64", per_token_projection=True),
    )


PRESETS = {"tiny": _tiny, "tiny23": _tiny23, "ltx2-video": _ltx2_video, "ltx23-video": _ltx23_video}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]()
    except KeyError:
        raise InputError(f"unknown preset {name!r}: choose one of {', '.join(sorted(PRESETS))}") from None
