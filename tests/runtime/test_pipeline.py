"""The lean runtime end to end on the tiny bundle: generation, determinism, parity, bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from stdrc.runtime.errors import BundleError, InputError, NoFaceError
from stdrc.runtime.pipeline import Pipeline
from stdrc.runtime.video import psnr, read_video


@pytest.fixture(scope="module")
def pipe(tiny_bundle: Path) -> Pipeline:
    return Pipeline.from_bundle(tiny_bundle)


def test_generate_writes_video_and_contact_sheet(pipe: Pipeline, astronaut_png: Path, tmp_path: Path) -> None:
    out = tmp_path / "clip.mp4"
    result = pipe.generate(reference=astronaut_png, prompt="a woman smiles", seed=1, steps=4, output=out)
    assert result.frames.shape == (9, 64, 96, 3) and result.frames.dtype == np.uint8
    assert result.reference.shape == (64, 96, 3)
    video = read_video(out)
    assert video.shape == (9, 64, 96, 3)
    # noise-like tiny-model frames compress badly; per-frame colour means survive a lossy codec
    means = lambda v: v.reshape(9, -1, 3).mean(axis=1)  # noqa: E731
    assert np.abs(means(video) - means(result.frames)).max() < 12
    sheet = Path(result.files["contact_sheet"])
    assert sheet.is_file() and sheet.stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4", "clip_sheet.png"]  # no temp files left


def test_same_seed_same_video(pipe: Pipeline, astronaut_png: Path) -> None:
    a = pipe.generate(reference=astronaut_png, prompt="a woman waves", seed=3, steps=3)
    b = pipe.generate(reference=astronaut_png, prompt="a woman waves", seed=3, steps=3)
    c = pipe.generate(reference=astronaut_png, prompt="a woman waves", seed=4, steps=3)
    assert np.array_equal(a.frames, b.frames) and np.array_equal(a.latent, b.latent)
    assert not np.array_equal(a.latent, c.latent)


def test_reference_and_prompt_steer_the_result(pipe: Pipeline, astronaut_png: Path) -> None:
    base = pipe.generate(reference=astronaut_png, prompt="a woman waves", seed=3, steps=3)
    other_prompt = pipe.generate(reference=astronaut_png, prompt="a dog jumps", seed=3, steps=3)
    whole_photo = pipe.generate(reference=astronaut_png, prompt="a woman waves", seed=3, steps=3, face_crop=False)
    assert not np.allclose(base.latent, other_prompt.latent)
    assert not np.allclose(base.latent, whole_photo.latent)


def test_batched_streams_equal_split_streams(pipe: Pipeline, astronaut_png: Path) -> None:
    a = pipe.generate(reference=astronaut_png, prompt="p", seed=5, steps=2, max_batch=3)
    b = pipe.generate(reference=astronaut_png, prompt="p", seed=5, steps=2, max_batch=1)
    assert np.abs(a.latent - b.latent).max() <= 1e-4


def test_onnxruntime_matches_pytorch_backend(tiny_bundle: Path, cache_dir: Path, tmp_path_factory,
                                             astronaut_png: Path) -> None:
    from stdrc.engines.build import BuildConfig, build_engines

    torch_bundle = build_engines(BuildConfig(out=tmp_path_factory.mktemp("tb") / "tiny-torch", backend="torch",
                                             cache_dir=cache_dir, progress=False))
    ort_result = Pipeline.from_bundle(tiny_bundle).generate(reference=astronaut_png, prompt="a woman", seed=2)
    torch_pipe = Pipeline.from_bundle(torch_bundle, trust_code=True)
    torch_result = torch_pipe.generate(reference=astronaut_png, prompt="a woman", seed=2)
    assert psnr(ort_result.frames, torch_result.frames) >= 40.0


def test_onnxruntime_path_never_imports_torch(tiny_bundle: Path, astronaut_png: Path, tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from stdrc.runtime.pipeline import Pipeline\n"
        f"p = Pipeline.from_bundle({str(tiny_bundle)!r})\n"
        f"p.generate(reference={str(astronaut_png)!r}, prompt='hi', steps=2, output={str(tmp_path / 'x.mp4')!r})\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'ltx_core', 'onnx'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_no_face_is_a_clear_error(pipe: Pipeline, blank_png: Path) -> None:
    with pytest.raises(NoFaceError, match="--no-face-crop"):
        pipe.generate(reference=blank_png, prompt="x", steps=1)
    assert pipe.generate(reference=blank_png, prompt="x", steps=1, face_crop=False).frames.shape[0] == 9


def test_bad_api_arguments(pipe: Pipeline, astronaut_png: Path) -> None:
    with pytest.raises(InputError, match="--steps 1 to 1000"):
        pipe.generate(reference=astronaut_png, prompt="x", steps=0)
    with pytest.raises(InputError, match="max_batch"):
        pipe.generate(reference=astronaut_png, prompt="x", max_batch=4)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stdrc.cli", *args], capture_output=True, text=True)


def test_cli_generate_json(tiny_bundle: Path, astronaut_png: Path, tmp_path: Path) -> None:
    out = tmp_path / "v.mp4"
    proc = _cli("generate", "--bundle", str(tiny_bundle), "--ref", str(astronaut_png), "--prompt", "hello",
                "--steps", "2", "-o", str(out), "--json", "-q")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["frames"] == 9 and data["size"] == [96, 64] and Path(data["video"]).is_file()


def _bad_bundle(tiny_bundle: Path, tmp_path: Path, change: str) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    if change == "missing":
        (copy / "vae_decoder.onnx").unlink()
    elif change == "truncated":
        data = (copy / "dit.onnx").read_bytes()
        (copy / "dit.onnx").write_bytes(data[: len(data) // 3])
    elif change == "version":
        manifest = json.loads((copy / "manifest.json").read_text())
        manifest["format"] = 99
        (copy / "manifest.json").write_text(json.dumps(manifest))
    elif change == "no-manifest":
        (copy / "manifest.json").unlink()
    return copy


@pytest.mark.parametrize("case,message", [
    ("missing-image", "does not exist"),
    ("unreadable-image", "cannot be read as an image"),
    ("no-face", "--no-face-crop"),
    ("missing", "vae_decoder.onnx is missing"),
    ("truncated", "does not match its sha256"),
    ("version", "format 99 is not supported"),
    ("no-manifest", "manifest.json is missing"),
    ("steps", "--steps 1 to 1000"),
    ("unwritable", "not writable"),
    ("face-models", "insightface model folder"),
])
def test_cli_bad_input(case: str, message: str, tiny_bundle: Path, astronaut_png: Path, blank_png: Path,
                       tmp_path: Path) -> None:
    bundle, ref, out, extra = tiny_bundle, astronaut_png, tmp_path / "out.mp4", []
    if case == "missing-image":
        ref = tmp_path / "nope.png"
    elif case == "unreadable-image":
        ref = tmp_path / "text.png"
        ref.write_text("not an image")
    elif case == "no-face":
        ref = blank_png
    elif case in ("missing", "truncated", "version", "no-manifest"):
        bundle = _bad_bundle(tiny_bundle, tmp_path, case)
    elif case == "steps":
        extra = ["--steps", "0"]
    elif case == "unwritable":
        out = tmp_path / "no" / "such" / "dir" / "out.mp4"
    elif case == "face-models":
        extra = ["--face-models", str(tmp_path / "no-models")]
    proc = _cli("generate", "--bundle", str(bundle), "--ref", str(ref), "--prompt", "x", "-o", str(out), "-q", *extra)
    assert proc.returncode == 2, proc.stderr  # bad input (README: exit codes)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists() and not list(out.parent.glob("*.mp4")) if out.parent.exists() else True


def test_bundle_from_another_backend_is_refused(tiny_bundle: Path) -> None:
    with pytest.raises(BundleError, match="rebuild it with --backend tensorrt"):
        Pipeline.from_bundle(tiny_bundle, backend="tensorrt")


def test_ort_engine_keeps_bound_inputs_and_rebinds_new_ones(tiny_bundle):
    """IO binding for the inputs fixed within a generation: same results as a plain run; a new array
    object (another generation) is placed anew, never a stale copy."""
    from stdrc.runtime.backends.onnxruntime import OrtEngine
    from stdrc.runtime.manifest import read_manifest
    from stdrc.runtime.sampler import FIXED_INPUTS

    entry = read_manifest(tiny_bundle).components["dit"]
    engine = OrtEngine(tiny_bundle / entry.file, entry)
    feeds = {t.name: np.random.default_rng(0).standard_normal(
        [3 if d == "batch" else d for d in t.shape]).astype(t.dtype) for t in entry.inputs}
    feeds["context_mask"] = np.ones_like(feeds["context_mask"])
    feeds["attn_mask"] = np.ones_like(feeds["attn_mask"])
    plain = engine.run(feeds)["velocity"]
    kept = engine.run(feeds, keep=FIXED_INPUTS)["velocity"]
    assert np.array_equal(plain, kept)
    step2 = {**feeds, "latent": feeds["latent"] * 0.5}
    assert np.array_equal(engine.run(step2, keep=FIXED_INPUTS)["velocity"], engine.run(step2)["velocity"])
    other = {**step2, "context": feeds["context"] * 2.0}  # a new generation's context
    assert np.array_equal(engine.run(other, keep=FIXED_INPUTS)["velocity"], engine.run(other)["velocity"])
    assert not np.array_equal(engine.run(other)["velocity"], engine.run(step2)["velocity"])
