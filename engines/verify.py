"""`verify`: every bundle component against the PyTorch reference on the same seeded inputs.

ONNX files run through polygraphy's ONNX Runtime runner, other engines through the runtime's own
backends; polygraphy's comparator then checks every output (shapes, NaN, mean error within the
component's tolerance) and, with `report=True`, prints its per-output statistics. The numbers we
keep per component are max_abs_err and rel_l2 over all outputs and batch sizes.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from stdrc.export.config import get_preset
from stdrc.export.errors import CheckpointError
from stdrc.export.lora import LoraSpec, match_manifest
from stdrc.export.models import load_models
from stdrc.export.specs import component_specs
from stdrc.runtime.backends import check_trust, open_engine
from stdrc.runtime.manifest import check_files, read_manifest
from stdrc.runtime.options import check_path
from stdrc.runtime.tiling import DecodeTiling

# rel L2 tolerated per engine precision (fp32: the 1e-4)
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 3e-2, "fp8": 1e-1}


@dataclass(frozen=True)
class ComponentReport:
    max_abs_err: float
    rel_l2: float
    tolerance: float
    ok: bool
    backend: str
    precision: str


@contextmanager
def _engine_runner(bundle: Path, name: str, entry, device: str, report: bool,  # noqa: ANN001, ANN202
                   trust_code: bool = False):
    """feeds -> outputs: polygraphy's OnnxrtRunner for ONNX files, else the runtime's engine for the backend."""
    if entry.backend != "onnxruntime":
        yield open_engine(bundle, name, entry, device, trust_code=trust_code).run
        return
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    from stdrc.runtime.backends.onnxruntime import providers_for

    session = SessionFromOnnx(str(bundle / entry.file), providers=providers_for(device))
    with _polygraphy_log(report), OnnxrtRunner(session, name=name) as runner:
        yield lambda feeds: dict(runner.infer({t.name: feeds[t.name] for t in entry.inputs}))


def polygraphy_check(name: str, got: list[dict[str, np.ndarray]], ref: list[dict[str, np.ndarray]],
                     tolerance: float, report: bool = False) -> bool:
    """polygraphy's comparator over every output and batch: mean |error| <= tolerance * RMS(reference).

    rel_l2 <= tolerance implies it (mean |d| <= RMS(d)); it adds shape and NaN/inf checks and, with
    `report`, polygraphy's per-output statistics on stdout.
    """
    from polygraphy.comparator import Comparator, IterationResult, RunResults, SimpleCompareFunc

    def rms(v: np.ndarray) -> float:
        return float(np.sqrt(np.mean(np.square(v.astype(np.float64)))))

    # one tolerance per output (polygraphy's granularity): the largest RMS over batches keeps the implication
    atol = {k: tolerance * max(rms(it[k]) for it in ref) for k in ref[0]}
    results = RunResults()
    for runner, iterations in ((name, got), ("pytorch", ref)):
        results.append((runner, [IterationResult(dict(it), runner_name=runner) for it in iterations]))
    with _polygraphy_log(report):
        accuracy = Comparator.compare_accuracy(results, compare_func=SimpleCompareFunc(
            check_shapes=True, check_error_stat="mean", atol=atol, rtol={k: 0.0 for k in atol}))
    return bool(accuracy)


@contextmanager
def _polygraphy_log(report: bool):  # noqa: ANN202
    """polygraphy logs on stdout: its INFO lines only when a report is asked for (never into --json)."""
    from polygraphy.logger import G_LOGGER

    G_LOGGER.colors = False  # else it prints a hint to install `colored`
    with G_LOGGER.verbosity(G_LOGGER.INFO if report else G_LOGGER.CRITICAL):
        yield


def compare(actual: np.ndarray, expected: np.ndarray) -> tuple[float, float]:
    actual, expected = actual.astype(np.float64), expected.astype(np.float64)
    if actual.shape != expected.shape:
        return float("inf"), float("inf")
    diff = actual - expected
    rel = np.linalg.norm(diff) / max(np.linalg.norm(expected), 1e-12)
    return float(np.abs(diff).max()), float(rel)


def verify_bundle(bundle: str | Path, checkpoint: str | Path | None = None, seed: int = 1234,
                  device: str = "cpu", text_encoder: str | Path | None = None,
                  text_checkpoint: str | Path | None = None, loras: tuple[LoraSpec, ...] = (),
                  report: bool = False, trust_code: bool = False) -> dict[str, ComponentReport]:
    """`trust_code`: allow torch/aoti bundles, whose loading runs code from the bundle (README, Trust)."""
    bundle = check_path(bundle, "bundle folder")
    manifest = read_manifest(bundle)
    for name, entry in manifest.components.items():
        check_trust(name, entry, trust_code)
    check_files(bundle, manifest)
    if manifest.checkpoint_sha256 and checkpoint is None:
        raise CheckpointError(f"{bundle} was built from a checkpoint: pass --checkpoint with that file to verify it")
    if manifest.text.get("tokenizer") == "hf-tokenizers" and text_encoder is None:
        raise CheckpointError(f"{bundle} uses a Gemma-3 text side: pass --text-encoder with that folder to verify it")
    loras = match_manifest(manifest.loras, tuple(loras), bundle)  # the manifest keeps names and hashes, not paths
    preset = get_preset(manifest.preset)
    models = load_models(preset.name, checkpoint, seed=manifest.model_config.get("seed", 0),
                         face_weights=None, text_encoder=text_encoder, text_checkpoint=text_checkpoint,
                         loras=loras)
    if manifest.checkpoint_sha256 and models.checkpoint_sha256 != manifest.checkpoint_sha256:
        raise CheckpointError(f"{checkpoint} is not the checkpoint {bundle} was built from (sha256 differs)")
    modules = models.export_modules(manifest.bucket, manifest.rope["layout"])
    specs = component_specs(models.preset, manifest.bucket, DecodeTiling.from_json(manifest.decode))
    reports = {}
    for name, entry in manifest.components.items():
        batches = [None] if "batch" not in entry.dynamic_dims else sorted({entry.dynamic_dims["batch"][0],
                                                                            entry.dynamic_dims["batch"][1]})
        got, expected = [], []
        with _engine_runner(bundle, name, entry, device, report, trust_code) as run:
            for batch in batches:
                feeds = specs[name].sample_inputs(seed=seed, batch=batch)
                got.append(run(feeds))
                with torch.no_grad():
                    ref = modules[name](*[torch.from_numpy(feeds[t.name]) for t in specs[name].inputs])
                ref = ref if isinstance(ref, (tuple, list)) else (ref,)
                expected.append({spec.name: value.float().numpy() for spec, value in zip(entry.outputs, ref)})
        errors = [compare(g[k], e[k]) for g, e in zip(got, expected) for k in e]
        worst = (max(err[0] for err in errors), max(err[1] for err in errors))
        tol = TOLERANCE.get(entry.precision, 1e-4)
        matched = polygraphy_check(name, got, expected, tol, report)
        reports[name] = ComponentReport(worst[0], worst[1], tol, worst[1] <= tol and matched, entry.backend,
                                        entry.precision)
    return reports


def reports_json(reports: dict[str, ComponentReport]) -> dict:
    return {"components": {k: asdict(v) for k, v in reports.items()}, "ok": all(r.ok for r in reports.values())}
