"""The ST-DRC DiT: ltx-core's LTX-2 / LTX-2.3 video-only transformer behind the plain-tensor interface
of DESIGN.md §3.

`STDRCTransformer.forward` takes tokens, per-token timesteps, text context and masks, and
precomputed RoPE tables, so no position or trigonometry math is left inside an exported graph.
It calls ltx-core's own preprocessor pieces and blocks, so it computes what `LTXModel.forward`
computes for the same tokens and positions. A DiT with the prompt AdaLN (`cross_attention_adaln`,
LTX-2.3) also takes the stream's global `sigma`, as ltx-core's `Modality.sigma`: reference tokens keep
timestep 0 for their own modulation while the text keys and values are modulated by the stream's sigma.
"""

from __future__ import annotations

import fnmatch

import torch
from ltx_core.guidance.perturbations import BatchedPerturbationConfig
from ltx_core.model.transformer.modality import Modality
from ltx_core.model.transformer.model import LTXModel
from ltx_core.model.transformer.model_configurator import LTXVideoOnlyModelConfigurator
from ltx_core.model.transformer.transformer_args import TransformerArgs

from stdrc.export.config import DiTConfig
from stdrc.export.specs import SIGMA_INPUT

# One sample with no perturbation: blocks run full self-attention whatever the batch size.
# (An empty list would make `all_in_batch` true and silently skip self-attention.)
_NO_PERTURBATION = BatchedPerturbationConfig.empty(1)

DIT_INPUTS = ("latent", "timestep", "context", "context_mask", "attn_mask")
DIT_OUTPUTS = ("velocity",)
ROPE_INPUTS = ("rope_cos", "rope_sin")


def dit_input_names(cfg: DiTConfig, rope_input: bool = False) -> tuple[str, ...]:
    """The DiT's inputs in forward order: DIT_INPUTS, the RoPE tables when fed, `sigma` when taken."""
    return (*DIT_INPUTS, *(ROPE_INPUTS if rope_input else ()), *((SIGMA_INPUT,) if cfg.takes_sigma else ()))


def build_ltx_model(cfg: DiTConfig) -> LTXModel:
    """ltx-core's video-only LTXModel, materialised on CPU (its caption projection is built on meta)."""
    model = LTXVideoOnlyModelConfigurator.from_config(cfg.ltx_config())
    return model.to_empty(device="cpu") if any(p.is_meta for p in model.parameters()) else model


# DiT layers kept in high precision under FP8 (module-path patterns: modelopt's calibration, the fast path).
SENSITIVE_LAYER_PATTERNS = (
    "*patchify_proj*",  # latent -> hidden: first layer, every token
    "*caption_projection*",  # text features -> context
    "*adaln*",  # adaln_single, prompt_adaln_single: timestep -> modulation of every block
    "*timestep_embedder*",
    "*proj_out*",  # hidden -> velocity: last layer
    "*norm_out*",
)
# ltx-core's fp8_scaled_mm policy (quantization/fp8_scaled_mm.py:111-126) also keeps block 0 and blocks
# 43..47 (the last five of 48) in high precision, by absolute index: LTX-2.3's pre-quantized files follow it.
# Taken for the 2.3 arithmetic (`cross_attention_adaln`); LTX-2's calibration keeps the list above.
FP8_POLICY_BLOCKS = (0, 43, 44, 45, 46, 47)
FP8_POLICY_PATTERNS = (*SENSITIVE_LAYER_PATTERNS, *(f"*transformer_blocks.{i}.*" for i in FP8_POLICY_BLOCKS))


def fp8_policy_excluded(linear: str) -> bool:
    """True for a Linear (LTXModel module path, e.g. `transformer_blocks.0.attn1.to_q`) that ltx-core's
    fp8_scaled_mm policy keeps in high precision: Lightricks' pre-quantized files leave it bf16."""
    return any(fnmatch.fnmatchcase(linear, p) for p in FP8_POLICY_PATTERNS)


def sensitive_layer_patterns(dit: torch.nn.Module) -> tuple[str, ...]:
    """The high-precision patterns for `dit` (any module holding the LTXModel): 2.3 adds FP8_POLICY_BLOCKS."""
    ltx = next((m for m in dit.modules() if isinstance(m, LTXModel)), None)
    if ltx is None or not ltx.cross_attention_adaln:
        return SENSITIVE_LAYER_PATTERNS
    return FP8_POLICY_PATTERNS


def init_seeded(module: torch.nn.Module, seed: int, std: float = 0.05) -> None:
    """Deterministic values for every parameter and buffer: ltx-core leaves some as `torch.empty`."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        # state_dict: parameters and persistent buffers; derived constant tables are left alone
        for name, tensor in module.state_dict(keep_vars=True).items():
            if not tensor.is_floating_point():
                continue
            if name.endswith("std-of-means"):
                tensor.copy_(1.0 + 0.1 * torch.rand(tensor.shape, generator=gen))
            elif name.endswith("timestep_scale_multiplier"):
                tensor.fill_(1000.0)
            elif tensor.ndim <= 1 and ("norm" in name and name.endswith("weight")):
                tensor.fill_(1.0)
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * std)


def key_bias(attn_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, N] 1/0 key visibility -> additive (B, 1, 1, N) bias, as ltx-core biases text keys."""
    return ((attn_mask.to(dtype) - 1) * torch.finfo(dtype).max).reshape(attn_mask.shape[0], 1, 1, -1)


class STDRCTransformer(torch.nn.Module):
    """Wraps an `LTXModel` (video only); its state dict keys are LTX-2's under the `ltx.` prefix."""

    fp32_inputs = ("timestep", "sigma")  # ltx-core embeds sigma * 1000 in fp32 (export/onnx_export.py CastIO)

    def __init__(self, ltx: LTXModel):
        super().__init__()
        self.ltx = ltx

    def forward(
        self,
        latent: torch.Tensor,  # [B, N, C]
        timestep: torch.Tensor,  # [B, N] sigma per token
        context: torch.Tensor,  # [B, L, context_dim]
        context_mask: torch.Tensor,  # [B, L] int64 1/0
        attn_mask: torch.Tensor,  # [B, N] int64 1 = visible as key
        rope_cos: torch.Tensor,
        rope_sin: torch.Tensor,
        sigma: torch.Tensor | None = None,  # [B] the stream's sigma: needed by the prompt AdaLN, else unused
    ) -> torch.Tensor:
        m = self.ltx
        prep = m.video_args_preprocessor
        batch = latent.shape[0]
        dtype = latent.dtype
        x = m.patchify_proj(latent)
        timesteps, embedded = prep._prepare_timestep(timestep, m.adaln_single, batch, dtype)
        prompt_timestep = None
        if prep.prompt_adaln is not None:
            if sigma is None:
                raise ValueError("this DiT has a prompt AdaLN (cross_attention_adaln): "
                                 "pass the stream's sigma [B]")
            # the ONNX exporter may give each input's batch its own symbol; the prompt modulation broadcasts
            # context against sigma's embedding, so both are tied to the latent's batch here
            sigma = sigma.reshape(batch)
            context = context.reshape(batch, *context.shape[1:])
            prompt_timestep, _ = prep._prepare_timestep(sigma, prep.prompt_adaln, batch, dtype)
        # split RoPE reshapes queries by the table's batch size: give the table the real one
        cos = rope_cos.expand(batch, *rope_cos.shape[1:])
        sin = rope_sin.expand(batch, *rope_sin.shape[1:])
        args = TransformerArgs(
            x=x,
            context=prep._prepare_context(context, x),
            context_mask=prep._prepare_attention_mask(context_mask.to(torch.int64), dtype),
            timesteps=timesteps,
            embedded_timestep=embedded,
            positional_embeddings=(cos, sin),
            cross_positional_embeddings=None,
            cross_scale_shift_timestep=None,
            cross_gate_timestep=None,
            enabled=True,
            prompt_timestep=prompt_timestep,
            self_attention_mask=key_bias(attn_mask, dtype),
        )
        for block in m.transformer_blocks:
            args, _ = block(video=args, audio=None, perturbations=_NO_PERTURBATION)
        return m._process_output(m.scale_shift_table, m.norm_out, m.proj_out, args.x, args.embedded_timestep)


class BakedRopeDiT(torch.nn.Module):
    """The DiT for one bucket with its RoPE tables baked in as constants (ONNX initializers)."""

    fp32_inputs = STDRCTransformer.fp32_inputs

    def __init__(self, dit: STDRCTransformer, rope_cos: torch.Tensor, rope_sin: torch.Tensor):
        super().__init__()
        self.dit = dit
        self.register_buffer("rope_cos", rope_cos.clone())
        self.register_buffer("rope_sin", rope_sin.clone())

    def forward(self, latent, timestep, context, context_mask, attn_mask, sigma=None):
        return self.dit(latent, timestep, context, context_mask, attn_mask, self.rope_cos, self.rope_sin,
                        sigma)


class LtxCoreDiT(torch.nn.Module):
    """ltx-core's own `LTXModel.forward` behind the DiT's named inputs: `verify`'s reference, independent of
    `STDRCTransformer.forward` and of the bundle's RoPE tables (ltx-core derives RoPE from `positions`)."""

    def __init__(self, ltx: LTXModel):
        super().__init__()
        self.ltx = ltx

    def forward(self, positions: torch.Tensor, latent: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
                context_mask: torch.Tensor, attn_mask: torch.Tensor, sigma: torch.Tensor | None = None,
                **rope_tables: torch.Tensor) -> torch.Tensor:
        batch, tokens = latent.shape[:2]
        if sigma is None:  # read only by the prompt AdaLN, which a DiT taking no sigma lacks
            sigma = torch.zeros(batch)
        video = Modality(latent=latent, sigma=sigma, timesteps=timestep,
                         positions=positions.expand(batch, -1, -1, -1), context=context,
                         context_mask=context_mask.to(torch.int64),
                         attention_mask=attn_mask[:, None, :].expand(-1, tokens, -1).float())  # (B, T, T) 1/0
        out, _ = self.ltx(video=video, audio=None, perturbations=BatchedPerturbationConfig.empty(batch))
        return out


def ltx_core_dit(ckpt, transform=None) -> LtxCoreDiT:
    """fp32 `LTXModel` as ltx-core's video-only configurator builds it from the checkpoint's own `config` (not
    this project's reading of it), the file's weights streamed in one tensor at a time through `transform`
    (fused LoRAs): what `verify` compares a bundle's DiT with when the file has a `transformer` config."""
    from stdrc.export.checkpoint import load_streaming  # checkpoint.py imports vae.py, which imports this module

    with torch.device("meta"):
        model = LTXVideoOnlyModelConfigurator.from_config(ckpt.metadata_config)
    model = model.to_empty(device="cpu").float().eval()
    load_streaming(model, ckpt, "dit", "DiT", transform)
    return LtxCoreDiT(model)


def build_dit(cfg: DiTConfig, seed: int | None = 0) -> STDRCTransformer:
    ltx = build_ltx_model(cfg)
    if seed is not None:
        init_seeded(ltx, seed)
    return STDRCTransformer(ltx).eval()
