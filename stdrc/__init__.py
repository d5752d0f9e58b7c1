"""stdrc: exported inference runtime for ST-DRC (identity-preserving text-to-video on LTX-2).

``from stdrc import Pipeline`` is the entry point (``Pipeline.from_bundle(dir).generate(...)``).
Stages live in their own subpackages: ``stdrc.export`` (PyTorch model + ONNX export),
``stdrc.engines`` (engines and the bundle), ``stdrc.calibration`` (FP8) and
``stdrc.runtime`` (the lean runtime, no torch on the ONNX Runtime path).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["Pipeline", "GenerationResult", "__version__"]

if TYPE_CHECKING:
    from stdrc.runtime.pipeline import GenerationResult, Pipeline


def __getattr__(name: str):
    if name in ("Pipeline", "GenerationResult"):
        from stdrc.runtime import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'stdrc' has no attribute {name!r}")
