"""Which model a checkpoint holds, LTX-2 or LTX-2.3, decided from its header alone.

ltx-core has no version switch: the arithmetic follows from the `config` metadata's transformer keys
(`apply_gated_attention`, `cross_attention_adaln`, the four V2 caption keys), and ltx-pipelines reads
`model_version` ("2.3...") for its defaults. A file is one family when all of those agree with each other
and with its tensor names; anything else (a partial V2 set, flags of both families, LTX-2.3 tensors under
an LTX-2 config, a fixed ltx-core key with another value) is refused in one line, before any weight is read.
Keys ltx-core does not read cannot change its arithmetic, and are ignored.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from stdrc.export.checkpoint import per_token_projection
from stdrc.export.config import DiTConfig, ModelFamily
from stdrc.export.errors import CheckpointError

# Tensor names (a whole dotted part) found in one family only. Audio-stream names differ (`audio_...`).
KEY_PARTS = {
    ModelFamily.LTX2: ("caption_projection", "aggregate_embed"),
    ModelFamily.LTX23: ("to_gate_logits", "prompt_adaln_single", "prompt_scale_shift_table",
                        "video_aggregate_embed"),
}
_FLAGS = ("apply_gated_attention", "cross_attention_adaln")


def _fixed_keys() -> dict[str, Any]:
    """The transformer keys ltx-core accepts one value of (its `check_config_value`s, as `ltx_config` states
    them); `attention_type` only picks a kernel."""
    fields = set(DiTConfig.__dataclass_fields__)
    return {k: v for k, v in DiTConfig().ltx_config()["transformer"].items()
            if k not in fields and k != "attention_type"}


def _config_votes(path: Path, transformer: dict[str, Any],
                  model_version: str | None) -> dict[str, ModelFamily]:
    """What each family-deciding item of the metadata says."""
    votes = {}
    for flag in _FLAGS:
        value = transformer.get(flag, False)
        if not isinstance(value, bool):
            raise CheckpointError(f"{path} matches neither LTX-2 nor LTX-2.3: config transformer.{flag} is "
                                  f"{value!r}, not true or false: use an unmodified LTX-2 or LTX-2.3 "
                                  "checkpoint")
        votes[flag] = ModelFamily.LTX23 if value else ModelFamily.LTX2
    try:
        v2 = per_token_projection(transformer)
    except CheckpointError as e:
        raise CheckpointError(f"{path} matches neither LTX-2 nor LTX-2.3: {e}") from e
    votes["the V2 caption keys"] = ModelFamily.LTX23 if v2 else ModelFamily.LTX2
    if model_version is not None:
        votes[f"model_version {model_version!r}"] = (ModelFamily.LTX23 if str(model_version).startswith("2.3")
                                                     else ModelFamily.LTX2)
    return votes


def _key_votes(keys: Iterable[str]) -> dict[ModelFamily, str]:
    """One tensor name per family whose names the file holds."""
    found: dict[ModelFamily, str] = {}
    for key in keys:
        parts = key.split(".")
        for family, names in KEY_PARTS.items():
            if family not in found and any(p in names for p in parts):
                found[family] = key
    return found


def detect_family(path: Path, config: dict[str, Any] | None, model_version: str | None,
                  keys: Iterable[str]) -> ModelFamily:
    """The family of the file at `path` from its header (metadata `config`, `model_version`, tensor names)."""
    transformer = (config or {}).get("transformer", {})
    for key, value in _fixed_keys().items():
        if key in transformer and transformer[key] != value:
            raise CheckpointError(
                f"{path} matches neither LTX-2 nor LTX-2.3: config transformer.{key} is "
                f"{transformer[key]!r}, which changes the model's arithmetic (ltx-core builds {value!r} "
                "only): use an unmodified LTX-2 or LTX-2.3 checkpoint")
    votes = _config_votes(path, transformer, model_version)
    by_config = set(votes.values())
    if len(by_config) > 1:
        said = "; ".join(f"{family.label}: {', '.join(k for k, v in votes.items() if v is family)}"
                         for family in ModelFamily if family in by_config)
        raise CheckpointError(f"{path} matches neither LTX-2 nor LTX-2.3: its config metadata mixes the two "
                              f"({said}): use an unmodified LTX-2 or LTX-2.3 checkpoint")
    family = by_config.pop()
    by_keys = _key_votes(keys)
    if len(by_keys) > 1:
        names = ", ".join(f"{f.label}'s {k}" for f, k in by_keys.items())
        raise CheckpointError(f"{path} matches neither LTX-2 nor LTX-2.3: it holds tensors of both "
                              f"({names}): use an unmodified LTX-2 or LTX-2.3 checkpoint")
    for other, key in by_keys.items():
        if other is not family:
            says = (f"its config metadata says {family.label}" if config
                    else "no config metadata (ltx-core then builds LTX-2)")
            raise CheckpointError(f"{path} matches neither LTX-2 nor LTX-2.3: it holds {other.label} tensors "
                                  f"({key}) but {says}: use a checkpoint whose config metadata is the one it "
                                  "was saved with")
    return family
