"""Hostile and careless inputs through the real CLIs: exit 2, one `error:` line, no traceback, nothing left behind.

Crash classes (OpenCV on non-UTF-8 paths, decompression bombs, malformed manifests, ffmpeg logs)
run `stdrc` / `stdrc-export` in subprocesses; value checks that end before any engine loads
call `main(argv)` in-process. Each test works in its own tmp folder and checks that nothing
was written there (no output, no partial file) and that the shared bundle is unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from stdrc.runtime.errors import BundleError, InputError
from stdrc.runtime.manifest import check_files, read_manifest, sha256_file

RUNTIME, EXPORT = "stdrc.cli", "stdrc.engines.cli"


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every path under `folder` with size and mtime: equal before and after = nothing touched."""
    return {str(p.relative_to(folder)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in folder.rglob("*")}


def cli(module: str, *args: str | bytes, cwd: Path) -> subprocess.CompletedProcess:
    # onnxruntime writes ~/.cache/Microsoft on import: a HOME beside the test folder, not in it
    env = {**os.environ, "HOME": str(cwd.parent / "home"), "STDRC_CACHE": str(cwd.parent / "cache")}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, timeout=300,
                          check=False)


def refused(returncode: int, stderr: str | bytes, *words: str) -> str:
    """The one clean failure: exit 2, exactly one `error:` line holding `words`, no traceback."""
    err = stderr.decode("utf-8", "replace") if isinstance(stderr, bytes) else stderr
    lines = [line for line in err.splitlines() if "error:" in line]
    assert returncode == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(("error:", "stdrc")), err  # never behind a progress bar
    for word in words:
        assert word in lines[0], err
    return lines[0]


@pytest.fixture
def work(tmp_path: Path, astronaut_png: Path) -> Path:
    """A fresh folder holding only a reference photo; tests assert what else appears in it."""
    shutil.copy(astronaut_png, tmp_path / "ref.png")
    return tmp_path


@pytest.fixture
def bundle_copy(tiny_bundle: Path, tmp_path: Path):
    """A bundle (files hard-linked, manifest copied) whose manifest a test may edit."""

    def make(edit) -> Path:
        out = tmp_path / "bundle"
        shutil.copytree(tiny_bundle, out, copy_function=os.link)
        path = out / "manifest.json"
        data = json.loads(path.read_text())
        path.unlink()  # the hard link would edit the shared bundle's manifest
        path.write_text(json.dumps(edit(data) or data))
        return out

    return make


def generate_args(bundle: Path, ref: str | bytes = "ref.png", out: str | bytes = "out.mp4") -> list:
    return ["generate", "--bundle", str(bundle), "--ref", ref, "--prompt", "a woman", "-o", out, "--steps", "2"]


# -- generation options: checked before anything loads, in the library (serve and app get them too) --------

BAD_OPTIONS = {
    "nan text scale": (["--text-scale", "nan"], "text_scale"),
    "inf ref scale": (["--ref-scale", "inf"], "ref_scale"),
    "reversed guidance interval": (["--guidance-interval", "0.9", "0.1"], "reversed"),
    "interval beyond sigma 1": (["--guidance-interval", "0.1", "3"], "guidance interval"),
    "cfg rescale above 1": (["--cfg-rescale", "1.5"], "cfg_rescale"),
    "cfg rescale below 0": (["--cfg-rescale", "-0.1"], "cfg_rescale"),
    "negative seed": (["--seed", "-1"], "seed"),
    "seed past int64": (["--seed", str(2**63)], "seed"),
    "steps 10000": (["--steps", "10000"], "--steps 1 to 1000"),
    "steps 0": (["--steps", "0"], "--steps"),
    "max batch 4": (["--max-batch", "4"], "max_batch"),
    "unknown backend": (["--backend", "bogus"], "unknown backend 'bogus'"),
}


@pytest.mark.parametrize("case", BAD_OPTIONS)
def test_bad_generation_option_is_one_line(case: str, work: Path, tiny_bundle: Path, capsys, monkeypatch) -> None:
    from stdrc.cli import main

    args, word = BAD_OPTIONS[case]
    monkeypatch.chdir(work)
    before, bundle = snapshot(work), snapshot(tiny_bundle)
    code = main([*generate_args(tiny_bundle), *args])
    err = capsys.readouterr().err
    refused(code, err, word)
    assert "sampling" not in err  # no progress bar was drawn
    assert snapshot(work) == before and snapshot(tiny_bundle) == bundle


@pytest.mark.parametrize("name,word", [("out", "must end in .mp4"), ("folder.mp4", "is a folder"),
                                       ("missing/out.mp4", "does not exist")])
def test_unusable_output_path(name: str, word: str, work: Path, tiny_bundle: Path, capsys, monkeypatch) -> None:
    from stdrc.cli import main

    (work / "folder.mp4").mkdir()
    monkeypatch.chdir(work)
    before = snapshot(work)
    refused(main(generate_args(tiny_bundle, out=name)), capsys.readouterr().err, word)
    assert snapshot(work) == before


def test_library_checks_options_before_work(tiny_bundle: Path, astronaut_png: Path, tmp_path: Path) -> None:
    """What `stdrc serve` and `stdrc app` call: the same checks, as InputError, with nothing written."""
    from stdrc.runtime.pipeline import Pipeline

    pipe = Pipeline.from_bundle(tiny_bundle)
    bad = [{"prompt": "a\udcffb"}, {"prompt": "ok", "negative_prompt": "\ud800"}, {"prompt": "ok", "seed": -5},
           {"prompt": "ok", "seed": 1.5}, {"prompt": "ok", "text_scale": float("nan")},
           {"prompt": "ok", "guidance_interval": (0.8, 0.2)}, {"prompt": "ok", "cfg_rescale": float("inf")},
           {"prompt": "ok", "output": str(tmp_path / "a\x00b.mp4")}, {"prompt": "ok", "output": tmp_path}]
    for kwargs in bad:
        with pytest.raises(InputError):
            pipe.generate(astronaut_png, **kwargs)
    for reference in (str(tmp_path / "x\x00.png"), str(tmp_path / "x\udcff.png")):
        with pytest.raises(InputError, match="NUL|UTF-8"):
            pipe.generate(reference, prompt="ok", face_crop=False)
    assert list(tmp_path.iterdir()) == []


# -- crash classes, through the real CLI in subprocesses ------------------------------------------------------


def bomb_png(path: Path, width: int = 100_000, height: int = 100_000) -> Path:
    """A valid PNG of a few hundred bytes whose header claims width x height pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def test_crash_inputs_are_one_line(work: Path, tiny_bundle: Path) -> None:
    """Non-UTF-8 paths (OpenCV segfaulted), lone surrogates, a decompression bomb, a text file as image."""
    shutil.copy(work / "ref.png", os.fsencode(work) + b"/ref\xff.png")
    bomb_png(work / "bomb.png")
    bomb_png(work / "big.png", 9000, 9000)  # under Pillow's own limit, over ours
    (work / "notes.png").write_text("not an image")
    cases = {
        "non-UTF-8 reference path": (generate_args(tiny_bundle, ref=b"ref\xff.png"), "not valid UTF-8"),
        "non-UTF-8 output path": (generate_args(tiny_bundle, out=b"out\xff.mp4"), "not valid UTF-8"),
        "decompression bomb": (generate_args(tiny_bundle, ref="bomb.png"), "64 Mpx"),
        "large header": (generate_args(tiny_bundle, ref="big.png"), "9000x9000"),
        "text file as image": (generate_args(tiny_bundle, ref="notes.png"), "cannot be read as an image"),
    }
    prompt = generate_args(tiny_bundle)
    prompt[prompt.index("--prompt") + 1] = b"a \xff\xfe woman"  # arrives as lone surrogates
    cases["lone surrogates in the prompt"] = (prompt, "not valid Unicode")
    before = snapshot(work)
    for case, (args, word) in cases.items():
        done = cli(RUNTIME, *args, cwd=work)
        assert done.returncode != -11, f"{case}: segfault"
        refused(done.returncode, done.stderr, word)
        assert snapshot(work) == before, case


def _set(path: list, value):
    def edit(data: dict) -> None:
        target = data
        for key in path[:-1]:
            target = target[key]
        if value is KeyError:
            del target[path[-1]]
        else:
            target[path[-1]] = value
    return edit


def test_malformed_manifests_through_the_cli(work: Path, bundle_copy, tmp_path: Path) -> None:
    """Wrong types and paths leaving the bundle, each one clean line from `stdrc generate`."""
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(tmp_path / "ref.png", outside / "dit.onnx")
    digest = sha256_file(outside / "dit.onnx")
    cases = {
        "components: []": (_set(["components"], []), "components is [], expected an object"),
        "model_config without dit": (_set(["model_config", "dit"], KeyError), "lacks model_config.dit"),
        "file: null": (_set(["components", "dit", "file"], None), "components.dit.file is None"),
        "../ path with matching sha": (lambda d: d["components"]["dit"].update(file="../outside/dit.onnx",
                                                                               sha256=digest), "leaves the bundle"),
        "absolute path": (_set(["components", "dit", "file"], "/etc/passwd"), "leaves the bundle"),
        "NaN sigma": (lambda d: d["sampler"]["sigmas"].__setitem__(1, float("nan")), "sampler.sigmas"),
        "torch bundle without trust": (_set(["components", "dit", "backend"], "torch"), "--trust-bundle-code"),
    }
    outside_before = snapshot(outside)
    for case, (edit, word) in cases.items():
        bundle = bundle_copy(edit)
        before = snapshot(work)
        done = cli(RUNTIME, *generate_args(bundle), cwd=work)
        refused(done.returncode, done.stderr, word)
        assert snapshot(work) == before and not (work / "out.mp4").exists(), case
        shutil.rmtree(bundle)
    assert snapshot(outside) == outside_before


def test_symlink_out_of_the_bundle_is_refused(bundle_copy, work: Path, tmp_path: Path) -> None:
    bundle = bundle_copy(lambda d: None)
    outside = tmp_path / "elsewhere.onnx"
    shutil.copy(bundle / "dit.onnx", outside)  # same bytes: the sha256 matches, the place does not
    (bundle / "dit.onnx").unlink()
    (bundle / "dit.onnx").symlink_to(outside)
    done = cli(RUNTIME, *generate_args(bundle), cwd=work)
    refused(done.returncode, done.stderr, "outside the bundle folder")


def test_manifest_schema_grid(bundle_copy, tmp_path: Path) -> None:
    """More wrong types and ranges, through the loader every CLI uses (one BundleError line each)."""
    cases = [
        _set(["components", "dit", "inputs"], {}), _set(["components", "dit", "sha256"], "abc"),
        _set(["components", "dit", "backend"], "pickle"), _set(["components", "dit", "dynamic_dims"], {"b": [3, 1]}),
        _set(["components", "extra"], {}), _set(["bucket", "frames"], "9"), _set(["bucket", "fps"], -1),
        _set(["bucket", "video_tokens"], 13), _set(["sampler", "steps"], True), _set(["sampler", "steps"], 10**6),
        _set(["guidance", "text_scale"], None), _set(["rope"], "rope.npz"),
        _set(["text", "tokenizer"], "sentencepiece"),
        _set(["model_config", "vae", "timestep_conditioning"], 1), _set(["decode"], {"tile_height": 0}),
        _set(["components", "dit", "extra_files"], {"../x": "0" * 64}), _set(["rope", "file"], "C:/rope.npz"),
        _set(["format"], True), _set(["preset"], ["tiny"]),
        _set(["buckets"], []), _set(["buckets"], KeyError), _set(["buckets", 0, "height"], 100),
        _set(["buckets", 0, "rope", "file"], "../rope.npz"), _set(["format"], 3),
    ]
    for i, edit in enumerate(cases):
        bundle = bundle_copy(edit)
        with pytest.raises(BundleError) as info:
            check_files(bundle, read_manifest(bundle), hashes=False)
        message = str(info.value)
        assert "\n" not in message and "rebuild" in message, (i, message)
        shutil.rmtree(bundle)


def test_tokenizer_file_is_sha_checked(bundle_copy) -> None:
    """Every file the runtime reads is in the sha256 list, the Gemma tokenizer.json included."""
    bundle = bundle_copy(lambda d: d.update(text={"tokenizer": "hf-tokenizers", "file": "tokenizer.json",
                                                  "sha256": "0" * 64, "max_length": 16, "pad_id": 0}))
    (bundle / "tokenizer.json").write_text("{}")
    with pytest.raises(BundleError, match="tokenizer.json does not match its sha256"):
        check_files(bundle, read_manifest(bundle))


def test_trust_is_needed_only_for_code_bundles(bundle_copy, tiny_bundle: Path, capsys) -> None:
    from stdrc.engines.cli import main
    from stdrc.runtime.pipeline import Pipeline

    bundle = bundle_copy(_set(["components", "vae_decoder", "backend"], "aoti"))
    with pytest.raises(BundleError, match="runs code from the bundle"):
        Pipeline.from_bundle(bundle)
    refused(main(["verify", str(bundle)]), capsys.readouterr().err, "--trust-bundle-code")
    assert Pipeline.from_bundle(tiny_bundle).manifest.preset == "tiny"  # ONNX bundles need no flag


def test_not_a_video_is_one_short_line(work: Path, tiny_bundle: Path) -> None:
    (work / "fake.mp4").write_bytes(b"\0" * 4096)
    done = cli(RUNTIME, "facesim", "fake.mp4", "--ref", "ref.png", "--embedder",
               str(tiny_bundle / "face_encoder.onnx"), cwd=work)
    line = refused(done.returncode, done.stderr, "cannot read video")
    assert len(line) < 300 and "ffmpeg version" not in done.stderr.decode(), done.stderr


# -- consistent answers ---------------------------------------------------------------------------------------


def test_no_face_is_na_in_generate_and_facesim(work: Path, tiny_bundle: Path, blank_png: Path) -> None:
    done = cli(RUNTIME, *generate_args(tiny_bundle), "--json", cwd=work)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["facesim"] is None  # the tiny model's frames hold no face
    score = cli(RUNTIME, "facesim", "out.mp4", "--ref", "ref.png", "--embedder",
                str(tiny_bundle / "face_encoder.onnx"), "--json", cwd=work)
    assert score.returncode == 0, score.stderr
    assert json.loads(score.stdout)["facesim"] is None
    # a reference without a face fails after the bundle loads, before any bar is drawn
    (work / "out.mp4").unlink()
    (work / "out_sheet.png").unlink()
    before = snapshot(work)
    shutil.copy(blank_png, work / "blank.png")
    before = snapshot(work)
    done = cli(RUNTIME, *generate_args(tiny_bundle, ref="blank.png"), cwd=work)
    err = done.stderr.decode()
    refused(done.returncode, err, "no face found")
    assert "sampling" not in err and snapshot(work) == before


# -- build-engines: values, and output safety -----------------------------------------------------------------

BAD_BUILDS = {
    "width 0": (["--width", "0"], "use --width 32"),
    "frames 0": (["--frames", "0"], "use --frames 1 or 9"),
    "fps inf": (["--fps", "inf"], "--fps inf"),
    "negative seed": (["--seed", "-1"], "--seed -1"),
    "odd decode tile": (["--decode-tile", "33"], "decode tile"),
}


@pytest.mark.parametrize("case", BAD_BUILDS)
def test_bad_build_value_is_one_line(case: str, tmp_path: Path, capsys) -> None:
    from stdrc.engines.cli import main

    args, word = BAD_BUILDS[case]
    refused(main(["build-engines", "-q", "--out", str(tmp_path / "b"), "--cache-dir", str(tmp_path / "c"), *args]),
            capsys.readouterr().err, word)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # stdrc-export processes
def test_build_cli_fps_nan_and_backend_bogus(tmp_path: Path) -> None:
    done = cli(EXPORT, "build-engines", "-q", "--out", "b", "--fps", "nan", cwd=tmp_path)
    refused(done.returncode, done.stderr, "--fps nan")
    done = cli(EXPORT, "build-engines", "-q", "--out", "b", "--backend", "bogus", cwd=tmp_path)
    refused(done.returncode, done.stderr, "invalid choice: 'bogus'", "onnxruntime")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_build_never_replaces_what_is_not_a_bundle(tmp_path: Path, capsys) -> None:
    from stdrc.engines.cli import main

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("years of work")
    (tmp_path / "file").write_text("a file")
    before = snapshot(tmp_path)
    for out in ("mine", "file"):
        refused(main(["build-engines", "-q", "--out", str(tmp_path / out), "--cache-dir", str(tmp_path / "c")]),
                capsys.readouterr().err, "pass a ")  # a new folder, or a folder path for the bundle
    assert snapshot(tmp_path) == before


def test_existing_bundle_is_replaced_and_dead_staging_removed(tiny_bundle: Path, tmp_path: Path) -> None:
    from stdrc.engines.bundle import BundleWriter

    out = tmp_path / "b"
    shutil.copytree(tiny_bundle, out, copy_function=os.link)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    stale = tmp_path / f".b.partial-{int(dead.stdout)}"  # a build killed with SIGKILL left this
    stale.mkdir()
    (stale / "dit.onnx").write_bytes(b"half")
    alive = tmp_path / f".b.partial-{os.getppid()}"  # a build still running: left alone
    alive.mkdir()
    manifest = read_manifest(tiny_bundle)
    with BundleWriter(out) as writer:
        assert not stale.exists() and alive.is_dir()
        for rel in (*[e.file for e in manifest.components.values()], "rope.npz"):
            shutil.copy(tiny_bundle / rel, writer.path(rel))
        writer.path("marker").write_text("new")
        writer.commit(manifest)
    assert (out / "marker").read_text() == "new"
    check_files(out, read_manifest(out))
    assert sorted(p.name for p in tmp_path.iterdir()) == [alive.name, "b"]


def test_generation_still_works(work: Path, tiny_bundle: Path) -> None:
    """The checks refuse what is wrong, not what is right: same seed, same frames."""
    from stdrc.runtime.pipeline import Pipeline

    pipe = Pipeline.from_bundle(tiny_bundle)
    a = pipe.generate(work / "ref.png", prompt="a woman", seed=2**40, steps=2, guidance_interval=(0.2, 0.9),
                      cfg_rescale=1.0, text_scale=0.0)
    b = pipe.generate(work / "ref.png", prompt="a woman", seed=2**40, steps=2, guidance_interval=(0.2, 0.9),
                      cfg_rescale=1.0, text_scale=0.0)
    np.testing.assert_array_equal(a.frames, b.frames)
