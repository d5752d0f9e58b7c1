"""generate.py's two-stage mode on a full-width preset (issue 27): which presets and depths it builds from
benchmarks/synthetic.py's files, refused before anything is written."""

from __future__ import annotations

import pytest
from bench import bench_module  # tests/bench.py


@pytest.fixture(scope="module")
def generate():
    return bench_module("generate")


def test_full_width_two_stage_args(generate) -> None:
    cfg, as_json = generate.parse_args(["--preset", "ltx2-video", "--layers", "2", "--stages", "1", "2",
                                        "--bucket", "9x256x256", "--steps", "4", "--json"])
    assert (cfg.preset, cfg.layers, cfg.stages, cfg.bucket, cfg.steps, cfg.bundle) == \
        ("ltx2-video", 2, (1, 2), "9x256x256", 4, None) and as_json


@pytest.mark.parametrize("argv, needle", [
    (["--preset", "ltx2-video"], "needs real weights"),  # stage mode builds tiny only
    (["--preset", "tiny23", "--stages", "1", "2"], "writes ltx2-video and ltx23-video files only"),
    (["--preset", "ltx2-video", "--stages", "1", "2", "--layers", "0"], "--layers must be >= 1"),
])
def test_refusals(generate, capsys, argv: list[str], needle: str) -> None:
    with pytest.raises(SystemExit) as exc:
        generate.parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_benchmarks_default_to_the_clis_device(generate, tiny_bundle) -> None:
    """Issue 29, one device default: generate.py and dit_step.py take `--device auto` and resolve it as the
    stdrc CLIs do over the backends they run (here: CPU unless that backend can use CUDA), explicit values kept."""
    from stdrc.runtime.backends import resolve_device

    assert generate.parse_args([])[0].device == resolve_device("auto", ["onnxruntime"])
    assert generate.parse_args(["--bundle", str(tiny_bundle)])[0].device == resolve_device("auto", ["onnxruntime"])
    assert generate.parse_args(["--device", "cpu"])[0].device == "cpu"
    dit_step = bench_module("dit_step")
    assert dit_step.parse_args(["--backends", "onnxruntime"])[0].device == resolve_device("auto", ["onnxruntime"])
    assert dit_step.parse_args([])[0].device == resolve_device("auto", ["torch"])
    with pytest.raises(SystemExit):
        dit_step.parse_args(["--device", "gpu"])
