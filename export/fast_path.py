"""The GPU fast path of the PyTorch backend: bf16, SDPA attention, baked RoPE, FP8 GEMMs, CUDA graphs.

`prepare_fast_dit` turns an fp32 `STDRCTransformer` and one bucket's RoPE tables into a module
with `BakedRopeDiT`'s interface (latent, timestep, context, context_mask, attn_mask -> fp32
velocity). What it does, and why:

- bf16 weights and activations, as ltx-core runs LTX-2. Kept in fp32: the `timestep` and `sigma` inputs
  (bf16 cannot hold the schedule's sigmas, e.g. 0.99375), the sinusoidal timestep features
  (ltx-core computes them in fp32 and casts before the embedder), and the returned velocity
  (the Euler step runs in fp32). Norms run on bf16 tensors; PyTorch reduces them in fp32.
- Attention: ltx-core's `attention_type="pytorch"` calls `F.scaled_dot_product_attention`
  with an additive bias. Our key mask is a broadcast (B, 1, 1, N) bias, never a dense
  (B, 1, N, N) one, and the text mask is (B, 1, 1, L); both are cast to the activation dtype
  (a test records every SDPA call). CUDA's flash kernel takes no mask at all, so with the
  "no reference" stream in the batch (and with padded text) PyTorch has to pick the
  memory-efficient or cuDNN kernel, which take such a bias without materialising scores:
  expected, not yet seen on a GPU; `sdpa_choice` reports the pick (on CPU: the CPU flash
  kernel, which accepts masks). Letting CUDA flash run for batches whose keys are all
  visible needs `STDRCTransformer` to accept `attn_mask=None` (no bias); it does not yet.
- RoPE: the bucket's baked cos/sin tables, cast once to the activation dtype (as ltx-core
  casts its own tables), so a call does no position or trigonometry work. ltx-core's
  rotation is still a few elementwise kernels per q and k; `FastPathOptions.compile` lets
  Inductor fuse them (and the FP8 input quantisation) into neighbouring kernels.
- FP8 GEMMs: every `nn.Linear` outside `export.dit.sensitive_layer_patterns` becomes an
  `Fp8Linear` (`torch._scaled_mm`, E4M3, per-tensor scales from the calibration's
  `fp8_scales.json`). Attention itself stays bf16.
- CUDA graphs: the runtime's `CudaGraphStep` captures one forward per input shape and replays it.
  It has NOT been run yet: it was written in a session without a GPU.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from stdrc.export.dit import STDRCTransformer, sensitive_layer_patterns
from stdrc.export.errors import ExportError
from stdrc.export.fp8_scaled import FP8_E4M3_MAX, file_codes, quantize_e4m3, scale_layers, scaled_linear
from stdrc.runtime.backends.torch import CudaGraphStep

log = logging.getLogger(__name__)

RECALIBRATE = "recalibrate with `stdrc-export build-engines --calibrate-fp8` for these weights"


@dataclass(frozen=True)
class FastPathOptions:
    """How `prepare_fast_dit` builds the fast DiT.

    dtype: weights and activations (bfloat16; float32 is for checking the FP8 GEMMs exactly).
    fp8: FP8 GEMMs for the non-sensitive linears (needs calibrated scales).
    cuda_graph: replay one captured forward per input shape (CUDA only).
    fast_accum: `_scaled_mm`'s faster, less exact FP8 accumulation on Hopper.
    compile: `torch.compile` the module (fuses RoPE, norms, modulation and FP8 input quantisation).
    """

    dtype: torch.dtype = torch.bfloat16
    fp8: bool = False
    cuda_graph: bool = False
    fast_accum: bool = False
    compile: bool = False


# -- FP8 ----------------------------------------------------------------------------------------

class Fp8Linear(torch.nn.Module):
    """y = x W^T + b with E4M3 x and W and per-tensor scales, through `torch._scaled_mm`.

    The weight is a buffer, so `module.to(device)` keeps it in FP8; do not call `.to(dtype)`.
    """

    def __init__(self, weight: torch.Tensor, weight_scale: float, input_scale: float,
                 bias: torch.Tensor | None, fast_accum: bool = False):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.fast_accum = fast_accum
        scale = torch.tensor(weight_scale, dtype=torch.float32, device=weight.device)
        self.register_buffer("weight", quantize_e4m3(weight.detach(), scale))
        self.register_buffer("weight_scale", scale)
        input_scale = torch.tensor(input_scale, dtype=torch.float32, device=weight.device)
        self.register_buffer("input_scale", input_scale)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @staticmethod
    def from_linear(linear: torch.nn.Linear, input_scale: float, weight_scale: float, dtype: torch.dtype,
                    name: str = "linear", fast_accum: bool = False) -> Fp8Linear:
        """Quantize `linear`'s (fp32) weight; its bias is kept in `dtype`, the output dtype."""
        n, k = linear.weight.shape
        if n % 16 or k % 16:
            raise ExportError(f"{name} is {n}x{k}: FP8 GEMMs need both sides multiples of 16; "
                              "keep it in high precision (add it to SENSITIVE_LAYER_PATTERNS)")
        bias = None if linear.bias is None else linear.bias.to(dtype)
        return Fp8Linear(linear.weight.float(), weight_scale, input_scale, bias, fast_accum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        xq = quantize_e4m3(x.reshape(-1, self.in_features), self.input_scale)
        fused_bias = self.bias if x.dtype != torch.float32 else None  # bias epilogue: 16-bit outputs only
        out = torch._scaled_mm(xq, self.weight.t(), scale_a=self.input_scale, scale_b=self.weight_scale,
                               bias=fused_bias, out_dtype=x.dtype, use_fast_accum=self.fast_accum)
        if self.bias is not None and fused_bias is None:
            out = out + self.bias
        return out.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, fast_accum={self.fast_accum}")


def fp8_layer_names(dit: torch.nn.Module) -> list[str]:
    """The linears the calibration quantizes: every `nn.Linear` not matching a sensitive pattern."""
    patterns = sensitive_layer_patterns(dit)
    return [name for name, m in dit.named_modules() if isinstance(m, torch.nn.Linear)
            and not any(fnmatch.fnmatchcase(name, p) for p in patterns)]


def load_fp8_scales(path: str | Path) -> dict[str, float]:
    """`fp8_scales.json` as written by the calibration: "{layer}.input_scale" / ".weight_scale" -> float."""
    path = Path(path)
    try:
        scales = json.loads(path.read_text())
    except OSError as e:
        raise ExportError(f"cannot read FP8 scales {path} ({e.strerror}): build the bundle with "
                          "`stdrc-export build-engines --calibrate-fp8`, which writes fp8_scales.json") from e
    except json.JSONDecodeError as e:
        raise ExportError(f"{path} is not JSON ({e.msg}): {RECALIBRATE}") from e
    if not isinstance(scales, dict):
        raise ExportError(f"{path} holds no scale mapping: {RECALIBRATE}")
    bad = [k for k, v in scales.items() if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0]
    if bad:
        raise ExportError(f"{path}: scales must be positive finite numbers, not {bad[:3]}: {RECALIBRATE}")
    return {k: float(v) for k, v in scales.items()}


def _file_layer_scales(dit: torch.nn.Module, scales: dict[str, float]) -> dict[str, tuple[float, float]]:
    """A pre-quantized file's scales: its own layer list, each weight exactly its E4M3 codes times weight_scale."""
    layers = scale_layers(scales)
    for name, (_, weight_scale) in layers.items():
        file_codes(scaled_linear(dit, name).weight, weight_scale, name)
    return layers


def _layer_scales(dit: torch.nn.Module, scales: dict[str, float], from_file: bool = False
                  ) -> dict[str, tuple[float, float]]:
    """(input_scale, weight_scale) per FP8 layer, checked against the layers and their weights."""
    if from_file:
        return _file_layer_scales(dit, scales)
    layers = fp8_layer_names(dit)
    out = {}
    for name in layers:
        missing = [k for k in ("input_scale", "weight_scale") if f"{name}.{k}" not in scales]
        if missing:
            raise ExportError(f"FP8 scales have no {missing[0]} for {name}: {RECALIBRATE}")
        weight_scale = scales[f"{name}.weight_scale"]
        actual = float(dit.get_submodule(name).weight.detach().abs().max()) / FP8_E4M3_MAX
        if not math.isclose(weight_scale, actual, rel_tol=1e-5):
            raise ExportError(f"FP8 scales were calibrated on other weights ({name}: weight_scale "
                              f"{weight_scale:.6g}, these weights give {actual:.6g}): {RECALIBRATE}")
        out[name] = (scales[f"{name}.input_scale"], weight_scale)
    unknown = sorted({k.rpartition(".")[0] for k in scales} - set(layers))
    if unknown:
        raise ExportError(f"FP8 scales name {unknown[0]} (and {len(unknown) - 1} more), which this DiT "
                          f"does not quantize: {RECALIBRATE}")
    return out


# -- the fast module -----------------------------------------------------------------------------

class FastDiT(torch.nn.Module):
    """`BakedRopeDiT`'s interface at low precision: inputs cast in, fp32 velocity out."""

    def __init__(self, dit: STDRCTransformer, rope_cos: torch.Tensor, rope_sin: torch.Tensor,
                 dtype: torch.dtype):
        super().__init__()
        self.dit = dit
        self.dtype = dtype
        self.register_buffer("rope_cos", rope_cos.to(dtype).contiguous())
        self.register_buffer("rope_sin", rope_sin.to(dtype).contiguous())

    def forward(self, latent, timestep, context, context_mask, attn_mask, sigma=None):
        velocity = self.dit(latent.to(self.dtype), timestep.float(), context.to(self.dtype), context_mask,
                            attn_mask, self.rope_cos, self.rope_sin, None if sigma is None else sigma.float())
        return velocity.float()


def cast_copy(module: torch.nn.Module, dtype: torch.dtype,
              drop: tuple[torch.Tensor, ...] = ()) -> torch.nn.Module:
    """A deep copy whose floating tensors are made in `dtype` directly: no transient fp32 copy.

    Tensors in `drop` (weights about to be replaced) are copied as empty placeholders.
    """
    dropped = {id(t) for t in drop}

    def cast(t: torch.Tensor) -> torch.Tensor:
        new = t.new_empty(0, dtype=dtype) if id(t) in dropped else t.detach().to(dtype, copy=True)
        return torch.nn.Parameter(new, requires_grad=False) if isinstance(t, torch.nn.Parameter) else new

    memo = {id(t): cast(t) for t in [*module.parameters(), *module.buffers()] if t.is_floating_point()}
    return copy.deepcopy(module, memo).eval()


def prepare_fast_dit(dit: STDRCTransformer, rope_cos: torch.Tensor, rope_sin: torch.Tensor,
                     options: FastPathOptions = FastPathOptions(), scales: dict[str, float] | None = None,
                     device: str | torch.device = "cpu", scales_from_file: bool = False) -> torch.nn.Module:
    """A fast copy of `dit` (left untouched) for one bucket; a `CudaGraphStep` when `options.cuda_graph`.

    `scales`: `load_fp8_scales(...)` output, required with `options.fp8`. FP8 weights are
    quantized from the fp32 weights, before the bf16 cast. `scales_from_file`: they are a pre-quantized
    checkpoint's (export/fp8_scaled.py); its layers are the FP8 ones (its own exclusion list) and `dit` holds
    its dequantised weights, so the FP8 weights are the file's own codes.
    """
    if options.dtype not in (torch.bfloat16, torch.float32):
        raise ExportError(f"fast path dtype {options.dtype}: use torch.bfloat16 (or float32 for checks)")
    if options.cuda_graph and not torch.cuda.is_available():
        raise ExportError("CUDA graphs need a CUDA device: set FastPathOptions(cuda_graph=False) on CPU")
    if options.fp8 and scales is None:
        raise ExportError(f"FastPathOptions(fp8=True) needs calibrated scales: pass "
                          f"scales=load_fp8_scales(bundle / 'fp8_scales.json'); {RECALIBRATE}")
    fp8_layers = {}
    if options.fp8:  # quantized from the original's fp32 weights
        for name, (inp, wgt) in _layer_scales(dit, scales, scales_from_file).items():
            n, k = dit.get_submodule(name).weight.shape
            if n % 16 or k % 16:  # e.g. a gate over a few heads: tiny, and _scaled_mm cannot take it
                log.info("%s (%dx%d) stays in %s: FP8 GEMMs need multiples of 16", name, n, k, options.dtype)
                continue
            fp8_layers[name] = Fp8Linear.from_linear(dit.get_submodule(name), inp, wgt, options.dtype, name,
                                                     options.fast_accum)
    fast = cast_copy(dit, options.dtype, drop=tuple(dit.get_submodule(n).weight for n in fp8_layers))
    for name, layer in fp8_layers.items():
        parent, _, child = name.rpartition(".")
        setattr(fast.get_submodule(parent), child, layer)
    from ltx_core.model.transformer.attention import Attention, AttentionFunction

    for m in fast.modules():  # SDPA, whatever ltx-core's default (xformers when installed)
        if isinstance(m, Attention):
            m.attention_function = AttentionFunction.PYTORCH
    module: torch.nn.Module = FastDiT(fast, rope_cos, rope_sin, options.dtype).to(device)
    log.info("fast DiT: %s, %d FP8 linears, compile %s, CUDA graph %s", options.dtype, len(fp8_layers),
             options.compile, options.cuda_graph)
    if options.compile:
        module = torch.compile(module, dynamic=False)
    return CudaGraphStep(module) if options.cuda_graph else module


def sdpa_choice(batch: int, heads: int, q_len: int, kv_len: int, head_dim: int, dtype: torch.dtype,
                device: str | torch.device, key_bias: bool) -> str:
    """The SDPA kernel PyTorch would pick for these shapes, with or without a (B, 1, 1, kv) bias."""
    from torch.nn.attention import SDPBackend

    q = torch.empty(batch, heads, q_len, head_dim, dtype=dtype, device=device)
    kv = torch.empty(batch, heads, kv_len, head_dim, dtype=dtype, device=device)
    bias = torch.zeros(batch, 1, 1, kv_len, dtype=dtype, device=device) if key_bias else None
    return SDPBackend(torch._fused_sdp_choice(q, kv, kv, bias, 0.0, False)).name
