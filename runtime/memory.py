"""Memory plans: which engines are resident when, and what each stage of a generation needs.

The real model is a ~13B DiT and a ~12B Gemma-3: all resident at once is ~50 GB in fp16, while
a 24 GB card can hold one large engine at a time. Plans (DESIGN: "Fits a 24 GB GPU"):

- ``all``: every engine opened once and kept (lowest latency for repeated generations);
- ``staged``: each engine opened when its stage starts and released when it ends (reference
  encode -> Gemma -> text head -> DiT sampling -> [two stages: upsampler -> refinement DiT] -> decoder ->
  face encoder); a cached prompt never opens either text engine;
- ``auto``: ``all`` when the sum fits the device's free memory (with a margin), else ``staged``.

Weight bytes are the engine files' sizes (recorded in the manifest at build time); activation
bytes are estimates from the model config and the bucket, written out below so the arithmetic can
be checked. Torch-free.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stdrc.runtime.errors import InputError
from stdrc.runtime.schema import SPACE_SCALE
from stdrc.runtime.vocab import MEMORY_PLANS, TEXT_COMPONENTS

if TYPE_CHECKING:
    from stdrc.runtime.manifest import Bucket
    from stdrc.runtime.schema import ModelConfig, TextModel
    from stdrc.runtime.tiling import DecodeTiling

log = logging.getLogger(__name__)
# generation order; the stage that needs each component
STAGES = (("reference", "vae_encoder"), ("text", "text_gemma"), ("text head", "text_head"), ("sampling", "dit"),
          ("upsample", "upsampler"), ("refine", "dit_refine"),  # two-stage bundles only
          ("decode", "vae_decoder"), ("facesim", "face_encoder"))
MARGIN = 1.10  # allocator slack, CUDA context, workspace: `auto` picks `all` only with 10% to spare
# What a running engine session holds beyond its weights and the activation formula: the graph, kernels,
# thread pool and allocator, a CPU convolution's column buffers, library code paged in on first use.
# Measured 2026-12-02 on the reduced-depth ltx2-video bundle (fp32, ONNX Runtime 1.32 CPU, 9x64x64), RSS over
# weights + activation estimate: VAE encoder 2-12 MB, VAE decoder 16-28 MB, face encoder 48 MB (its load
# holds the embedded weights' protobuf beside the tensors): the largest, rounded up (docs/benchmarks.md).
# One allowance per peak, as one session runs at a time; the CUDA context is outside it (a device's own).
SESSION_BYTES = 48 * 2**20
GUIDANCE_STREAMS = 3
_LOW_PRECISION = {"fp16": 2, "bf16": 2, "fp8": 2}  # activations of low-precision engines stay 16-bit


def element_bytes(precision: str) -> int:
    return _LOW_PRECISION.get(precision, 4)


def component_weight_bytes(bundle_dir: str | os.PathLike, file: str, extra_files: dict[str, str]) -> int:
    """Bytes of an engine on disk (graph + external data): what loading it puts in memory."""
    folder = Path(bundle_dir)
    names = [file, *(f for f in extra_files if f.endswith((".data", ".bin", ".onnx", ".plan", ".pt2")))]
    return sum((folder / n).stat().st_size for n in names if (folder / n).is_file())


UPSAMPLER_WIDTH = 512  # mid channels of Lightricks' x2 spatial upsampler (export/upsampler.py X2_UPSAMPLER)


def activation_bytes(component: str, model: ModelConfig, bucket: Bucket, precision: str,
                     decode: DecodeTiling | None = None) -> int:
    """A documented estimate of the live activations of one engine call for `bucket`.

    dit: the widest per-layer intermediates of the guidance batch (B = 3), feed-forward (4 D) plus
    q, k, v, attention out and two residuals (6 D), no N x N term (attention is fused in the graph);
    dit_refine: the same for one stream (stage 2 is unguided) at the output bucket (the DiT's stage 1 runs
    at its half, a quarter of the tokens, so the `dit` figure at the bucket bounds it);
    text_gemma, text_head: `gemma_activation_bytes`, `head_activation_bytes`;
    vae_decoder: three 128-channel maps at the decoder's last internal resolution (pixels over
    patch_size squared, before its depth-to-space) for every output frame, per tile when tiled;
    vae_encoder: the same for one frame; upsampler: three maps of the released x2 file's width
    (UPSAMPLER_WIDTH channels) at the output latent grid (after its pixel shuffle); face_encoder: a few
    MB. The engine library's own memory per session is SESSION_BYTES, added by `memory_needs`, not here.
    """
    e = element_bytes(precision)
    frames, height, width = bucket.frames, bucket.height, bucket.width
    if component in ("dit", "dit_refine"):
        d = model.dit
        inner = d.num_attention_heads * d.attention_head_dim
        streams = GUIDANCE_STREAMS if component == "dit" else 1
        return streams * (bucket.tokens * (4 * inner + 6 * inner) + bucket.text_length * d.cross_attention_dim) * e
    if component == "text_gemma":
        return gemma_activation_bytes(model.text, bucket.text_length, e)
    if component == "text_head":
        return head_activation_bytes(model.text, bucket.text_length, e)
    if component in ("vae_decoder", "vae_encoder"):
        if component == "vae_decoder" and decode:  # tiles of at most `tile` latents a side (+ overlap)
            side = (decode.tile + decode.overlap) * SPACE_SCALE
            height, width = min(height, side), min(width, side)
        patch = model.vae.patch_size
        pixels = height * width // (patch * patch) * (frames if component == "vae_decoder" else 1)
        return 3 * 128 * pixels * e
    if component == "upsampler":
        return 3 * UPSAMPLER_WIDTH * bucket.latent_frames * bucket.latent_height * bucket.latent_width * e
    return 8 * 2**20  # face encoder: 112x112 crops


def states_bytes(text: TextModel, length: int, e: int = 4) -> int:
    """What crosses from text_gemma to text_head: every hidden state once, (L + 1) x T x D, in the engine's
    precision (16-bit in a 16-bit engine). Gemma-3 12B, 1024 tokens: 49 x 1024 x 3840 x 2 B = 368 MiB."""
    return (text.encoder_layers + 1) * (length or text.max_length) * text.encoder_dim * e


def gemma_activation_bytes(text: TextModel, length: int, e: int = 4) -> int:
    """text_gemma's live activations for `length` tokens (T), `e` bytes an element: its outputs, every hidden
    state (`states_bytes`; ONNX Runtime CPU measured ~15 MB a layer from 3 to 4 full layers), plus one Gemma
    layer: its feed-forward (4 x T x ffn) and its unfused attention scores, heads x T x T, three copies
    (scores, masked, softmax) in fp32 whatever the precision (the softmax is upcast)."""
    length = length or text.max_length
    return states_bytes(text, length, e) + 4 * length * text.ffn * e + 3 * text.heads * length * length * 4


def head_activation_bytes(text: TextModel, length: int, e: int = 4) -> int:
    """text_head's live activations: its inputs (`states_bytes`), the feature extraction's working set for one
    state at a time (its normalised fp32 copy, T x D, and the fp32 sum, T x width; never a [T, D, L] stack:
    export/text.py), and one connector block: 14 rows of its width (q, k, v, RoPE copies,
    norms, 4x feed-forward in and out) and its heads' T x T probabilities (ONNX Runtime CPU's attention
    kernel), in fp32."""
    length = length or text.max_length
    c_heads = text.connector_heads
    c_width = c_heads * text.connector_head_dim or text.encoder_dim
    extraction = (length * text.encoder_dim + length * c_width) * 4
    connector = 14 * length * c_width * e + c_heads * length * length * 4
    return states_bytes(text, length, e) + extraction + connector


def text_activation_bytes(text: TextModel, length: int, e: int = 4) -> int:
    """Both text engines' activations as one graph held them (the hidden states counted once): what the
    one-engine text encoder needed, measured against the runs in docs/benchmarks.md (fp32 ONNX Runtime CPU,
    1024 tokens, width 3840: run peak over the weights minus SESSION_BYTES 353-377 MiB with narrow Gemma layers,
    402-748 MiB with Gemma-3 12B's own). The split's stages each need less: `memory_needs` charges each its own."""
    return gemma_activation_bytes(text, length, e) + head_activation_bytes(text, length, e) \
        - states_bytes(text, length, e)


@dataclass(frozen=True)
class StageNeed:
    stage: str
    component: str
    weight_bytes: int
    activation_bytes: int


@dataclass(frozen=True)
class MemoryPlanReport:
    """What each plan needs at its peak, stage by stage."""

    stages: tuple[StageNeed, ...]
    all_peak_bytes: int  # every engine resident + the largest stage's activations + one session's own
    staged_peak_bytes: int  # the largest single stage (its engine + its activations + its session's own)
    session_bytes: int = SESSION_BYTES

    def peak(self, plan: str) -> int:
        return self.all_peak_bytes if plan == "all" else self.staged_peak_bytes

    def to_json(self) -> dict[str, Any]:
        return {"stages": [s.__dict__ for s in self.stages], "all_peak_bytes": self.all_peak_bytes,
                "staged_peak_bytes": self.staged_peak_bytes, "session_bytes": self.session_bytes}


def memory_needs(weights: dict[str, int], activations: dict[str, int], skip_text: bool = False) -> MemoryPlanReport:
    """Per-stage needs from per-component weight and activation bytes. `skip_text`: the prompts are
    cached, so neither text stage runs. Each stage adds SESSION_BYTES (one session runs at a time)."""
    stages = tuple(StageNeed(stage, comp, weights[comp], activations.get(comp, 0))
                   for stage, comp in STAGES if comp in weights and not (skip_text and comp in TEXT_COMPONENTS))
    resident = sum(s.weight_bytes for s in stages)
    session = SESSION_BYTES if stages else 0
    largest_stage = max((s.weight_bytes + s.activation_bytes for s in stages), default=0)
    return MemoryPlanReport(
        stages=stages,
        all_peak_bytes=resident + max((s.activation_bytes for s in stages), default=0) + session,
        staged_peak_bytes=largest_stage + session,
        session_bytes=session,
    )


def parse_bytes(text: str) -> int:
    """'24GB', '24 GiB', '1.5e9', '800MB' -> bytes (GB and GiB both 2**30, as GPUs are sold)."""
    m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([kmgt]i?b?)?\s*", str(text).lower())
    if not m:
        raise InputError(f"memory size {text!r}: write it like 24GB, 16GiB or 800MB")
    unit = (m.group(2) or "b").rstrip("b").rstrip("i")
    value = float(m.group(1)) * 1024 ** ("kmgt".index(unit) + 1 if unit else 0)
    if not value > 0:
        raise InputError(f"memory size {text!r} must be > 0")
    return int(value)


def available_bytes(device: str) -> int | None:
    """Free memory where the engines will live: the GPU's (nvidia-smi) or the host's (MemAvailable)."""
    if device == "cuda":
        smi = shutil.which("nvidia-smi")
        if smi is None:
            return None
        try:
            out = subprocess.run([smi, "--query-gpu=memory.free", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=10, check=True).stdout
            return int(out.split()[0]) * 2**20
        except (OSError, subprocess.SubprocessError, ValueError, IndexError):
            return None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def choose_plan(plan: str, report: MemoryPlanReport, device: str) -> str:
    """Resolve `auto` (said in one log line); `all` and `staged` are taken as asked."""
    if plan not in MEMORY_PLANS:
        raise InputError(f"memory plan {plan!r}: use one of {', '.join(MEMORY_PLANS)}")
    if plan != "auto":
        return plan
    free = available_bytes(device)
    chosen = "all" if free is not None and report.all_peak_bytes * MARGIN <= free else "staged"
    log.info("memory plan auto -> %s (all needs %.2f GB, staged %.2f GB, %s free on %s)", chosen,
                report.all_peak_bytes / 2**30, report.staged_peak_bytes / 2**30,
                "unknown" if free is None else f"{free / 2**30:.2f} GB", device)
    return chosen


class EngineSet:
    """The bundle's engines, opened on first use (or by `warm`); under ``staged`` each is released after
    its stage, under ``all`` kept.

    `opened` records every open, in order, so callers (and tests) can see what a generation loaded.
    Releasing drops the session, runs the garbage collector (which frees ONNX Runtime's arena) and
    trims the C heap; torch's CUDA cache is emptied when torch is loaded.
    """

    def __init__(self, opener, names: list[str], plan: str):
        self._open = opener
        self._names = list(names)
        self.plan = plan
        self._live: dict[str, Any] = {}
        self.opened: list[str] = []
        # called as on_stage(event, name) with "open" (before opening), "opened" and "done" (before the
        # release): benchmarks measure memory per stage with it
        self.on_stage = None

    def warm(self) -> None:
        """Under ``all``, open every engine now (a server or the app loads before its first request)."""
        if self.plan == "all":
            self.values()

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __iter__(self):
        return iter(self._names)

    def __getitem__(self, name: str) -> Any:
        if name not in self._live:
            if name not in self._names:
                raise KeyError(name)
            self._event("open", name)
            self._live[name] = self._open(name)
            self.opened.append(name)
            self._event("opened", name)
        return self._live[name]

    def __setitem__(self, name: str, engine: Any) -> None:
        """Swap in another engine for `name` (benchmarks put the PyTorch fast path in the DiT's place)."""
        self._live[name] = engine

    def values(self) -> list[Any]:
        """Every engine (opening those not open yet), as a dict's values()."""
        return [self[name] for name in self._names]

    def loaded(self) -> list[str]:
        return list(self._live)

    def done(self, name: str) -> None:
        """End of `name`'s stage: under ``staged`` the engine is released."""
        if self.plan == "staged" and name in self._live:
            self._event("done", name)
            self.release(name)

    def _event(self, event: str, name: str) -> None:
        if self.on_stage is not None:
            self.on_stage(event, name)

    def release(self, name: str) -> None:
        import gc
        import sys

        engine = self._live.pop(name, None)
        close = getattr(engine, "close", None)
        if close is not None:
            close()
        del engine
        gc.collect()
        trim_heap()
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()


def trim_heap() -> bool:
    """Give the C heap's free pages back to the OS (glibc's malloc_trim); False where there is no such call.

    A released engine's small buffers sit in malloc's heap, whose free pages glibc keeps for reuse;
    trimming returns them so the next stage starts from the runtime's own footprint."""
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if not _LIBC:
        return False
    _LIBC.malloc_trim(0)
    return True


_LIBC = None  # loaded on the first trim; False where the C library has no malloc_trim (not glibc)
