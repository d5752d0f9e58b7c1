"""`build-engines` refuses bad arguments in one line, exit code 2, before any weight is read.

Each bad value is paired with a DiT-only checkpoint, whose loading would fail with another error
(no VAE): seeing the argument's own error proves the check ran before the checkpoint was used.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from stdrc.engines.cli import main
from stdrc.export.checkpoint import save_checkpoint
from stdrc.export.config import get_preset
from stdrc.export.dit import build_dit


@pytest.fixture(scope="module")
def dit_only(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "stdrc_dit.safetensors"
    save_checkpoint(path, build_dit(get_preset("tiny").dit, seed=1).ltx, layout="ltx")
    return path


def _build(capsys, tmp_path: Path, *args: str) -> tuple[int, str]:
    code = main(["build-engines", "-q", "--backend", "onnxruntime", "--cache-dir", str(tmp_path / "cache"), *args])
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize("args, message", [
    (["--frames", "10"], "frames=10 is not 8k+1: use --frames 9 or 17"),
    (["--width", "100"], "width=100 is not a positive multiple of 32"),
    (["--height", "0"], "height=0 is not a positive multiple of 32"),
    (["--fps", "nan"], "--fps nan must be a finite number > 0"),
    (["--precision", "bf16"], "--backend onnxruntime does not build --precision bf16 engines"),
    (["--precision", "fp8"], "FP8 needs --backend tensorrt or torch or aoti"),
    (["--backend", "torch", "--precision", "fp16"], "FP16 needs --backend onnxruntime or tensorrt"),
    (["--decode-tile", "50"], "decode tile 50 px must be a multiple of 32"),
    # two stages (issue 27): the stage-1 half must be a VAE size, both stage files or neither, input RoPE
    (["--two-stage"], "width=96 is not a multiple of 64, which two-stage generation needs"),
    (["--two-stage", "--bucket", "9x128x64", "--bucket", "9x128x96"], "height=96 is not a multiple of 64"),
    (["--upsampler", "up.safetensors"], "--upsampler without --refine-lora: a two-stage bundle needs both"),
    (["--refine-lora", "l.safetensors:0.5"], "--refine-lora without --upsampler"),
    (["--two-stage", "--width", "128", "--rope", "baked"], "a two-stage DiT runs two"),
    (["--two-stage", "--preset", "ltx2-video"], "--two-stage makes random stage pieces for the tiny presets only"),
    (["--two-stage", "--width", "128", "--backend", "torch", "--precision", "bf16"], "or two stages"),
    (["--upsampler", "missing.safetensors", "--refine-lora", "l.safetensors", "--width", "128"],
     "--upsampler missing.safetensors does not exist"),
])
def test_bad_argument_is_refused_before_loading(capsys, tmp_path: Path, dit_only: Path, args: list[str],
                                                message: str) -> None:
    out = tmp_path / "bundle"
    code, err = _build(capsys, tmp_path, "--checkpoint", str(dit_only), "--out", str(out), *args)
    assert code == 2
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1, err
    assert not out.exists() and not (tmp_path / "cache").exists()


def test_out_folder_that_is_not_a_bundle_is_left_alone(capsys, tmp_path: Path, dit_only: Path) -> None:
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"jpeg")
    code, err = _build(capsys, tmp_path, "--checkpoint", str(dit_only), "--out", str(out))
    assert code == 2 and "not a stdrc bundle" in err
    assert [p.name for p in out.iterdir()] == ["holiday.jpg"]
    file_out = tmp_path / "a_file"
    file_out.write_text("x")
    code, err = _build(capsys, tmp_path, "--out", str(file_out))
    assert code == 2 and "is a file" in err and file_out.read_text() == "x"


def test_files_must_exist_and_be_safetensors(capsys, tmp_path: Path, dit_only: Path) -> None:
    out = tmp_path / "bundle"
    code, err = _build(capsys, tmp_path, "--checkpoint", str(tmp_path / "nope.safetensors"), "--out", str(out))
    assert code == 2 and "--checkpoint" in err and "does not exist" in err
    pickled = tmp_path / "model.ckpt"
    pickled.write_bytes(pickle.dumps({"w": [1.0]}))
    code, err = _build(capsys, tmp_path, "--checkpoint", str(pickled), "--out", str(out))
    assert code == 2 and "not a safetensors file" in err
    code, err = _build(capsys, tmp_path, "--checkpoint", str(dit_only), "--base-checkpoint", str(pickled),
                       "--out", str(out))
    assert code == 2 and "not a safetensors file" in err
    code, err = _build(capsys, tmp_path, "--base-checkpoint", str(dit_only), "--out", str(out))
    assert code == 2 and "pass that --checkpoint too" in err
    code, err = _build(capsys, tmp_path, "--face-weights", str(tmp_path / "none.pth"), "--out", str(out))
    assert code == 2 and "--face-weights" in err
    code, err = _build(capsys, tmp_path, "--text-encoder", str(tmp_path / "no-gemma"), "--out", str(out))
    assert code == 2 and "--text-encoder" in err and "not a folder" in err
    code, err = _build(capsys, tmp_path, "--preset", "ltx2-video", "--out", str(out))
    assert code == 2 and "--text-encoder" in err
    assert not out.exists()


def test_dit_only_checkpoint_without_base_is_refused_in_one_line(capsys, tmp_path: Path, dit_only: Path) -> None:
    out = tmp_path / "bundle"
    code, err = _build(capsys, tmp_path, "--checkpoint", str(dit_only), "--out", str(out))
    assert code == 2 and "--base-checkpoint" in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_aoti_refuses_buckets_differing_in_frames_height_and_width(capsys, tmp_path: Path,
                                                                  dit_only: Path) -> None:
    """Inductor cannot lower a decoder with frames, tile height and tile width dynamic: one line, up front."""
    out = tmp_path / "bundle"
    code, err = _build(capsys, tmp_path, "--backend", "aoti", "--checkpoint", str(dit_only),
                       "--out", str(out), "--bucket", "9x96x64", "--bucket", "17x64x96")
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("error: --backend aoti cannot compile one VAE decoder") and "one frame count" in err
    assert not out.exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("backend, buckets", [
    ("aoti", ("9x96x64", "17x96x64")),   # frames only
    ("aoti", ("9x96x64", "9x64x96")),    # height and width only
    ("torch", ("9x96x64", "17x64x96")),  # exported program, no Inductor at build time
    ("onnxruntime", ("9x96x64", "17x64x96")),
])
def test_other_bucket_mixes_pass_the_decoder_check(tmp_path: Path, backend: str,
                                                   buckets: tuple[str, ...]) -> None:
    from stdrc.engines.build import BuildConfig
    from stdrc.engines.preflight import check_build

    got, _, rope = check_build(BuildConfig(out=tmp_path / "b", backend=backend, buckets=buckets), backend)
    assert [b.label() for b in got] == list(buckets) and rope == "input"


def test_disk_needs_count_the_bundle_and_the_largest_export(tmp_path: Path) -> None:
    from stdrc.engines.preflight import DISK_MARGIN_BYTES, disk_needs

    estimate = {"dit": 5 * 2**30, "vae_encoder": 3 * 2**30, "text_gemma": 2 * 2**30}
    out, cache = tmp_path / "new" / "bundle", tmp_path / "cache"  # neither exists yet: their disk is tmp_path's
    assert disk_needs(estimate, "onnxruntime", out, cache) == {tmp_path: 15 * 2**30 + DISK_MARGIN_BYTES}
    assert disk_needs(estimate, "aoti", out, cache) == {tmp_path: 10 * 2**30 + DISK_MARGIN_BYTES}  # no ONNX stage


def test_a_disk_too_small_is_refused_in_one_line() -> None:
    from stdrc.engines.preflight import check_disk_space
    from stdrc.runtime.errors import InputError

    disk = Path("/data")
    check_disk_space({disk: 10 * 2**30}, {disk: 10 * 2**30})  # exactly enough passes
    with pytest.raises(InputError) as refused:
        check_disk_space({disk: 10 * 2**30}, {disk: 4 * 2**30})
    message = str(refused.value)
    assert "\n" not in message and "10.0 GB free on the disk of /data" in message and "4.0 GB is free" in message
    assert "--out and --cache-dir on a larger disk" in message


@pytest.mark.parametrize("backend, precision, itemsizes", [
    ("onnxruntime", "fp32", {"dit": 4, "vae_decoder": 4}),
    ("onnxruntime", "fp16", {"dit": 2, "vae_decoder": 2}),
    ("tensorrt", "fp8", {"dit": 1, "vae_decoder": 2}),
    ("aoti", "bf16", {"dit": 2, "vae_decoder": 4}),  # the fast path lowers the DiT only
])
def test_engine_itemsize_follows_what_each_backend_writes(backend: str, precision: str,
                                                          itemsizes: dict[str, int]) -> None:
    from stdrc.engines.preflight import engine_itemsize

    assert {k: engine_itemsize(backend, precision, k) for k in itemsizes} == itemsizes
