"""The lean runtime: loads an engine bundle and generates video. Imports no model code.

``from stdrc.runtime import Pipeline`` loads the pipeline module on first use (PEP 562).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__all__ = ["Pipeline", "GenerationResult"]

if TYPE_CHECKING:
    from stdrc.runtime.pipeline import GenerationResult, Pipeline


def __getattr__(name: str):
    if name in __all__:
        from stdrc.runtime import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'stdrc.runtime' has no attribute {name!r}")
