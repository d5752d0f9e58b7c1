"""build-engines -> bundle -> verify, on the tiny preset with ONNX Runtime (fp32, CPU)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from stdrc.engines.build import BuildConfig, build_engines
from stdrc.engines.bundle import BundleWriter
from stdrc.engines.verify import REF_PRESET_CONFIG, REF_TEXT_HEAD, verify_bundle
from stdrc.runtime.errors import BundleError
from stdrc.runtime.manifest import FORMAT_VERSION, Manifest, TensorSpec, check_files, read_manifest, sha256_file


def test_manifest_describes_the_bundle(tiny_bundle: Path) -> None:
    m = read_manifest(tiny_bundle)
    assert m.format == FORMAT_VERSION and m.preset == "tiny"
    assert set(m.components) == {"text_gemma", "text_head", "dit", "vae_encoder", "vae_decoder", "face_encoder"}
    # the hidden states cross from Gemma's engine to the head's: every state, one input each, same shapes
    gemma, head = m.components["text_gemma"], m.components["text_head"]
    states = m.model_config.text.encoder_layers + 1  # the embeddings and one a layer
    assert [t.name for t in gemma.outputs] == [f"hidden_state_{i}" for i in range(states)]
    assert head.inputs == (TensorSpec("token_mask", (1, 16), "int64"), *gemma.outputs)
    assert [t.name for t in head.outputs] == ["context", "context_mask"]
    assert m.bucket.frames == 9 and m.bucket.video_tokens == 12 and m.bucket.reference_tokens == 6
    dit = m.components["dit"]
    assert [t.name for t in dit.inputs] == ["latent", "timestep", "context", "context_mask", "attn_mask"]
    assert dit.inputs[0].shape == ("batch", 18, 128) and dit.dynamic_dims == {"batch": [1, 3, 3]}
    assert m.rope.layout == "tass" and m.guidance.null_reference == "key_mask"
    assert len(m.sampler.sigmas) == m.sampler.steps + 1
    files = {**{e.file: e.sha256 for e in m.components.values()}, m.rope.file: m.rope.sha256}
    for rel, digest in files.items():
        assert sha256_file(tiny_bundle / rel) == digest
    check_files(tiny_bundle, m)
    # the model family is recorded; a manifest written before it reads as LTX-2
    assert m.model_config.family == "ltx2"
    data = json.loads((tiny_bundle / "manifest.json").read_text())
    del data["model_config"]["family"]
    assert Manifest.from_json(data).model_config.family == "ltx2"


def test_a_bundle_with_the_one_engine_text_encoder_is_refused(tiny_bundle: Path, tmp_path: Path, capsys) -> None:
    """Bundles built before the text side was split (one `text_encoder` engine, Gemma and its head together):
    one `error:` line naming the rebuild, exit 2, from the manifest alone (no engine file is read)."""
    from stdrc.cli import main

    data = json.loads((tiny_bundle / "manifest.json").read_text())
    data["components"]["text_encoder"] = data["components"].pop("text_gemma")
    del data["components"]["text_head"]
    with pytest.raises(BundleError, match="one-engine text_encoder .* text_gemma and text_head.*: rebuild it with"):
        Manifest.from_json(data)
    old = tmp_path / "old"
    old.mkdir()
    (old / "manifest.json").write_text(json.dumps(data))  # no engine files at all: refused before looking
    assert main(["plan", "--bundle", str(old)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "build-engines" in err[0], err


def test_verify_every_component_within_1e4(tiny_bundle: Path) -> None:
    reports = verify_bundle(tiny_bundle)
    assert set(reports) == {"text_gemma", "text_head", "dit", "vae_encoder", "vae_decoder", "face_encoder"}
    for name, r in reports.items():
        assert r.ok and r.rel_l2 <= 1e-4, (name, r)
        assert r.rel_l2 > 0 or r.max_abs_err == 0
    assert reports["dit"].reference == REF_PRESET_CONFIG  # ltx-core's LTXModel.forward on the seeded weights
    assert reports["text_head"].reference == REF_TEXT_HEAD  # ltx-core's feature extractor + connector


@pytest.mark.slow  # a second verify of the tiny bundle
def test_verify_cli_json(tiny_bundle: Path, capsys) -> None:
    """`stdrc-export verify --json` through its `main`, in-process (as a process: test_verify_cli_report)."""
    from stdrc.engines.cli import main

    assert main(["verify", str(tiny_bundle), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["family"] == "ltx2"
    assert set(data["components"]["dit"]) >= {"max_abs_err", "rel_l2", "ok"}
    assert data["ok"] is True


@pytest.mark.slow  # a stdrc-export verify process
def test_verify_cli_report(tiny_bundle: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "stdrc.engines.cli", "verify", str(tiny_bundle), "--report"],
                         capture_output=True, text=True, check=True)
    for name in ("text_gemma", "text_head", "dit", "vae_encoder", "vae_decoder", "face_encoder"):
        assert f"Accuracy Summary | {name} vs. pytorch" in out.stdout  # polygraphy's comparison per component
    assert "Passed: 2/2 iterations" in out.stdout  # the DiT at batch 1 and 3
    lines = out.stdout.strip().splitlines()
    assert lines[-1].startswith("face_encoder  onnxruntime fp32")
    assert lines[-7].split() == ["model", "ltx2"]  # before the six component lines


def test_tampered_engine_is_refused(tiny_bundle: Path, tmp_path: Path) -> None:
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    data = bytearray((copy / "dit.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "dit.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="does not match its sha256"):
        verify_bundle(copy)


def test_rebuild_uses_the_stage_cache(tiny_bundle: Path, cache_dir: Path, tmp_path: Path) -> None:
    # the cache is the test session's: other tests' builds may have added entries beside the tiny bundle's 5
    stamps = {p: p.stat().st_mtime_ns for p in cache_dir.rglob("*.done")}
    assert len(stamps) >= 5
    second = build_engines(BuildConfig(out=tmp_path / "again", cache_dir=cache_dir, backend="onnxruntime",
                                       progress=False))
    assert {p: p.stat().st_mtime_ns for p in cache_dir.rglob("*.done")} == stamps  # nothing exported again
    a, b = read_manifest(tiny_bundle), read_manifest(second)
    assert {k: v.sha256 for k, v in a.components.items()} == {k: v.sha256 for k, v in b.components.items()}


def test_interrupted_build_leaves_no_bundle(tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    with pytest.raises(RuntimeError):
        with BundleWriter(out) as writer:
            writer.path("dit.onnx").write_bytes(b"half")
            raise RuntimeError("killed mid-build")
    assert not out.exists()
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("args,message", [
    (["--frames", "10"], "not 8k+1"),
    (["--height", "100"], "multiple of 32"),
    (["--preset", "sd15"], "unknown preset"),
    (["--checkpoint", "missing.safetensors"], "does not exist"),
    (["--backend", "onnxruntime", "--precision", "fp8"], "FP8 needs --backend tensorrt"),
])
def test_build_bad_input_is_one_line(tmp_path: Path, args: list[str], message: str, capsys) -> None:
    """`stdrc-export build-engines`'s own `main` (in-process: a process per case only re-imports torch;
    tests/runtime/test_reliability.py runs build-engines refusals as processes)."""
    from stdrc.engines.cli import main

    out = tmp_path / "b"
    code = main(["build-engines", "-q", "--out", str(out), "--cache-dir", str(tmp_path / "c"), *args])
    err = capsys.readouterr().err
    assert code == 2, err  # bad input (README: exit codes)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], err
    assert "Traceback" not in err
    assert not out.exists()
