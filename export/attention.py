"""Fused attention in exported graphs: one op per attention, never MatMul -> Softmax -> MatMul over N x N.

Which op depends on the runtime that runs the graph (docs/design.md, "Attention in the graph"):

- ``ort``: ``com.microsoft.MultiHeadAttention`` with a (B, N) int32 key-padding mask. ONNX Runtime runs
  it fused on CPU and on the CUDA EP; its CPU kernel refuses ONNX ``Attention`` with a (B, 1, 1, N)
  key bias (measured with ORT 1.32), so the key bias travels as the equivalent key mask.
- ``onnx``: ONNX ``Attention`` (opset 23) with the additive (B, 1, 1, N) key bias, as torch's dynamo
  exporter writes SDPA at opset 23. TensorRT's ONNX parser takes it from 10.14 on and takes no
  ``com.microsoft`` op, so TensorRT plans are built from this graph.
- ``unfused``: the decomposed graph (MatMul, Softmax, MatMul), the pre-fusion baseline for benchmarks.

The swap is export-only: `fused_attention` sets ltx-core's per-module ``attention_function`` and
restores it on exit, so the PyTorch model stays what ltx-core computes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import onnx
import onnxscript
import torch
from ltx_core.model.transformer.attention import Attention, PytorchAttention
from onnx.defs import OpSchema

ATTENTION_KINDS = ("ort", "onnx", "unfused")
OPSET = {"ort": 20, "onnx": 23, "unfused": 20}  # 20: torch 2.13 dynamo default
MSFT_DOMAIN = "com.microsoft"


@torch.library.custom_op("stdrc::key_masked_attention", mutates_args=())
def key_masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor,
                         heads: int) -> torch.Tensor:
    """q [B, S, H*D], k/v [B, L, H*D], key_mask [B, L] int32 (1 = visible) -> [B, S, H*D]."""
    b, s, inner = q.shape
    q, k, v = (t.reshape(b, -1, heads, inner // heads).transpose(1, 2) for t in (q, k, v))
    bias = ((key_mask.to(q.dtype) - 1) * torch.finfo(q.dtype).max).reshape(b, 1, 1, -1)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    return out.transpose(1, 2).reshape(b, s, inner)


@key_masked_attention.register_fake
def _(q, k, v, key_mask, heads):
    return torch.empty_like(q)


def _register_mha_schema() -> None:
    """onnxscript (and onnx's checker) know ops by schema; ONNX holds none for ONNX Runtime's contrib ops.

    Registered as ONNX Runtime 1.2x documents it (ContribOperators.md), so graphs that ONNX Runtime's
    optimiser rewrote (it sets `unidirectional`) still pass onnx's checker.
    """
    if onnx.defs.has("MultiHeadAttention", MSFT_DOMAIN):
        return
    param, optional = OpSchema.FormalParameter, OpSchema.FormalParameterOption.Optional
    inputs = [param("query", "T"), param("key", "T", param_option=optional),
              param("value", "T", param_option=optional), param("bias", "T", param_option=optional),
              param("key_padding_mask", "M", param_option=optional),
              param("attention_bias", "T", param_option=optional),
              param("past_key", "T", param_option=optional), param("past_value", "T", param_option=optional),
              param("past_sequence_length", "M", param_option=optional),
              param("cache_indirection", "M", param_option=optional)]
    outputs = [param("output", "T")]  # the exporter makes a node with every declared output: only this one
    attr = OpSchema.Attribute
    onnx.defs.register_schema(OpSchema(
        "MultiHeadAttention", MSFT_DOMAIN, 1, inputs=inputs, outputs=outputs,
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], ""),
                          ("M", ["tensor(int32)"], "")],
        attributes=[attr("num_heads", OpSchema.AttrType.INT, "attention heads", required=True),
                    attr("mask_filter_value", OpSchema.AttrType.FLOAT, "bias of masked keys", required=False),
                    attr("scale", OpSchema.AttrType.FLOAT, "1/sqrt(head dim) when 0", required=False),
                    attr("unidirectional", OpSchema.AttrType.INT, "causal", required=False)],
    ))


def _mha_onnx(q, k, v, key_mask, heads: int):
    msft = onnxscript.values.Opset(MSFT_DOMAIN, 1)
    return msft.MultiHeadAttention(q, k, v, None, key_mask, num_heads=heads)


class KeyMaskedAttention:
    """ltx-core's attention callable, computing the same thing through `key_masked_attention`.

    ltx-core hands attention an additive key bias (0 visible, -max hidden) of shape (B, 1, 1, L);
    it becomes the (B, L) key mask the fused op takes.
    """

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
        b, keys = k.shape[0], k.shape[1]
        if mask is None:
            key_mask = torch.ones(b, keys, dtype=torch.int32, device=k.device)
        else:
            key_mask = (mask.expand(b, 1, 1, keys).reshape(b, keys) == 0).to(torch.int32)
        return torch.ops.stdrc.key_masked_attention(q, k, v, key_mask, heads)


def check_kind(kind: str) -> str:
    if kind not in ATTENTION_KINDS:
        raise ValueError(f"attention kind {kind!r}: choose one of {', '.join(ATTENTION_KINDS)}")
    return kind


def translation_table(kind: str) -> dict:
    """The exporter's custom translations for `kind` (only ``ort`` needs one)."""
    if check_kind(kind) != "ort":
        return {}
    _register_mha_schema()
    return {torch.ops.stdrc.key_masked_attention.default: _mha_onnx}


@contextlib.contextmanager
def fused_attention(module: torch.nn.Module, kind: str) -> Iterator[int]:
    """Within the block, every ltx-core `Attention` in `module` exports as `kind`; yields how many."""
    fn = KeyMaskedAttention() if check_kind(kind) == "ort" else PytorchAttention()
    layers = [m for m in module.modules() if isinstance(m, Attention)]
    saved = [m.attention_function for m in layers]
    try:
        for m in layers:
            m.attention_function = fn
        yield len(layers)
    finally:
        for m, old in zip(layers, saved):
            m.attention_function = old
