"""Errors of the export stage."""

from stdrc.runtime.errors import StdrcError


class ExportError(StdrcError):
    """An export or build step failed; the message names the fix."""


class CheckpointError(StdrcError):
    """A checkpoint is not safetensors, or does not match the preset."""


class LoraError(StdrcError):
    """A LoRA file is missing, not safetensors, or does not fit the DiT it is fused into."""
