"""`--backend torch --precision bf16|fp8`: the PyTorch fast path (export/fast_path.py) as bundle engines.

The DiT is exported in bf16 (FP8 GEMMs through `torch._scaled_mm` with the bundle's calibrated
scales); the other components stay fp32. Run here on CPU; CUDA graphs and GPU kernels are not.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from stdrc.runtime.errors import InputError
from stdrc.runtime.manifest import read_manifest
from stdrc.runtime.pipeline import Pipeline
from stdrc.runtime.video import psnr
from stdrc.runtime.vocab import COMPONENTS

pytestmark = pytest.mark.slow  # two torch.export bundles and one FP8 calibration: ~40 s on 2 CPU cores

PSNR_MIN_DB = 40.0  # frames vs the fp32 bundle, same seed (measured ~55 dB for both on tiny)


@pytest.fixture(scope="module", params=["bf16", "fp8"])
def fast_bundle(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    from stdrc.engines.build import BuildConfig, build_engines

    out = tmp_path_factory.mktemp("fast") / f"tiny-torch-{request.param}"
    return build_engines(BuildConfig(out=out, cache_dir=cache_dir, backend="torch", precision=request.param,
                                     progress=False))


def test_manifest_records_the_fast_dit(fast_bundle: Path) -> None:
    manifest = read_manifest(fast_bundle)
    precision = manifest.components["dit"].precision
    assert precision in ("bf16", "fp8")
    assert {e.precision for n, e in manifest.components.items() if n != "dit"} == {"fp32"}
    if precision == "fp8":
        assert "fp8_scales.json" in manifest.components["dit"].extra_files
        assert manifest.quality.fp8.calibration_batches > 0


def test_fast_bundle_verifies(fast_bundle: Path) -> None:
    from stdrc.engines.verify import TOLERANCE, verify_bundle

    reports = verify_bundle(fast_bundle, trust_code=True)
    assert all(r.ok for r in reports.values()), reports
    dit = reports["dit"]
    assert 1e-4 < dit.rel_l2 <= TOLERANCE[dit.precision]  # really low precision, within its bound


def test_fast_bundle_generates_like_fp32(fast_bundle: Path, tiny_bundle: Path, astronaut_png: Path) -> None:
    kwargs = dict(reference=astronaut_png, prompt="a woman smiles and waves", seed=4, steps=4)
    fast = Pipeline.from_bundle(fast_bundle, trust_code=True).generate(**kwargs)
    exact = Pipeline.from_bundle(tiny_bundle).generate(**kwargs)
    assert fast.frames.shape == exact.frames.shape
    assert psnr(fast.frames, exact.frames) >= PSNR_MIN_DB


def test_cuda_graphs_need_cuda(fast_bundle: Path) -> None:
    with pytest.raises(InputError, match="--device cuda"):
        Pipeline.from_bundle(fast_bundle, device="cpu", cuda_graphs=True, trust_code=True)


def test_fp16_is_refused_for_torch(tmp_path: Path, cache_dir: Path) -> None:
    from stdrc.engines.cli import main

    code = main(["build-engines", "--backend", "torch", "--precision", "fp16", "--out", str(tmp_path / "b"),
                 "--cache-dir", str(cache_dir), "-q"])
    assert code == 2 and not (tmp_path / "b").exists()


def test_torch_engines_come_from_the_stage_cache(cache_dir: Path, tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """A second torch build of the same inputs compiles nothing: every .pt2 is a copy of the cache's (not a
    link to it); a longer bucket rebuilds only what depends on frames (the DiT's RoPE and shapes, the decoder)."""
    from stdrc.engines.build import BuildConfig, build_engines

    def build(name: str, **kwargs) -> tuple[Path, set[str]]:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="stdrc.engines.stage_cache"):
            out = build_engines(BuildConfig(out=tmp_path / name, cache_dir=cache_dir, backend="torch",
                                            progress=False, **kwargs))
        return out, {Path(r.args[0]).name for r in caplog.records if r.msg.startswith("cache hit")}

    first, _ = build("first")  # fills the cache (the session's: an earlier fp32 torch build may have)
    second, hits = build("second")
    assert hits == {f"{name}.pt2" for name in COMPONENTS}
    a, b = read_manifest(first).components, read_manifest(second).components
    assert {k: v.sha256 for k, v in a.items()} == {k: v.sha256 for k, v in b.items()}
    assert all((second / f"{name}.pt2").stat().st_nlink == 1 for name in COMPONENTS)
    longer, hits = build("longer", frames=17)
    assert hits == {"text_gemma.pt2", "text_head.pt2", "face_encoder.pt2", "vae_encoder.pt2"}
    assert read_manifest(longer).components["dit"].sha256 != a["dit"].sha256
