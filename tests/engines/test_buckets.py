"""One bundle, many sizes (issue 12): buckets of different frame counts and aspect ratios in one bundle.

Tiny preset, ONNX Runtime fp32 on CPU. The multi-bucket bundle's DiT takes its RoPE tables as inputs
(one engine, dynamic token count), its VAE encoder a dynamic height/width and its decoder a dynamic
latent frame count; each size must match a single-bucket bundle of that size.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from stdrc.engines.build import BuildConfig, build_engines
from stdrc.engines.verify import verify_bundle
from stdrc.runtime.errors import InputError
from stdrc.runtime.manifest import read_manifest

# frames x width x height: the tiny default (landscape), a longer portrait one, a square one
BUCKETS = ("9x96x64", "17x64x96", "9x64x64")


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.fixture(scope="module")
def multi_bundle(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("buckets") / "three"
    return build_engines(BuildConfig(out=out, cache_dir=cache_dir, backend="onnxruntime", buckets=BUCKETS,
                                     progress=False))


@pytest.fixture(scope="module")
def portrait_bundle(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    """A single-bucket (baked RoPE) bundle of the second size."""
    out = tmp_path_factory.mktemp("buckets") / "portrait"
    return build_engines(BuildConfig(out=out, cache_dir=cache_dir, backend="onnxruntime", frames=17, height=96,
                                     width=64, progress=False))


@pytest.mark.slow  # builds the 3-bucket bundle
def test_manifest_lists_every_bucket_with_its_rope_table(multi_bundle: Path) -> None:
    m = read_manifest(multi_bundle)
    assert m.format == 2
    assert [b.label() for b in m.buckets] == list(BUCKETS)
    assert m.bucket == m.buckets[0] and m.rope.baked_in_dit is False
    assert len({b.rope.file for b in m.buckets}) == 3
    for b in m.buckets:
        with np.load(multi_bundle / b.rope.file) as t:
            assert t["cos"].shape[1] == b.tokens  # interleaved (1, N, inner)
    dit = m.components["dit"]
    names = [t.name for t in dit.inputs]
    assert names[-2:] == ["rope_cos", "rope_sin"]
    assert dit.dynamic_dims["tokens"] == [12, 18, 24]  # min, opt (the default's), max over the buckets
    assert m.components["vae_decoder"].dynamic_dims["latent_frames"] == [2, 2, 3]
    assert set(m.components["vae_encoder"].dynamic_dims) == {"height", "width"}
    per = m.memory.activation_bytes_per_bucket
    assert set(per) == set(BUCKETS)
    assert m.memory.activation_bytes["dit"] == max(p["dit"] for p in per.values())


def _graph_inputs_behind(graph: onnx.GraphProto, tensor: str) -> set[str]:
    """The graph inputs a tensor is computed from."""
    producers = {out: node for node in graph.node for out in node.output}
    inputs = {i.name for i in graph.input}
    found, todo, seen = set(), [tensor], set()
    while todo:
        name = todo.pop()
        if name in inputs:
            found.add(name)
        elif name not in seen and name in producers:
            seen.add(name)
            todo.extend(producers[name].input)
    return found


@pytest.mark.slow
def test_dit_graph_has_no_position_or_trigonometry_op(multi_bundle: Path, tiny_bundle: Path) -> None:
    """No Range (positions) and no trigonometry on positions: the only Sin/Cos is the sinusoidal timestep
    embedding, computed from the `timestep` input alone (RoPE comes in as precomputed tables)."""
    for bundle in (multi_bundle, tiny_bundle):
        graph = onnx.load(str(bundle / "dit.onnx"), load_external_data=False).graph
        assert not {n.op_type for n in graph.node} & {"Range", "Tan", "Atan"}, bundle
        trig = [n for n in graph.node if n.op_type in ("Sin", "Cos")]
        assert len(trig) <= 2 * 2  # adaln + prompt adaln timestep embedders at most
        for node in trig:
            assert _graph_inputs_behind(graph, node.input[0]) == {"timestep"}, (bundle, node.name)
    inputs = {i.name for i in onnx.load(str(multi_bundle / "dit.onnx"), load_external_data=False).graph.input}
    assert {"rope_cos", "rope_sin"} <= inputs


@pytest.mark.slow  # and a portrait bundle
def test_each_size_matches_a_single_bucket_bundle(multi_bundle: Path, tiny_bundle: Path, portrait_bundle: Path,
                                                  astronaut_png: Path) -> None:
    from stdrc.runtime.pipeline import Pipeline

    multi = Pipeline.from_bundle(multi_bundle)
    for single, (frames, height, width) in ((tiny_bundle, (9, 64, 96)), (portrait_bundle, (17, 96, 64))):
        got = multi.generate(reference=astronaut_png, prompt="a woman smiles", seed=3, frames=frames,
                             height=height, width=width)
        assert got.frames.shape == (frames, height, width, 3)
        want = Pipeline.from_bundle(single).generate(reference=astronaut_png, prompt="a woman smiles", seed=3)
        assert want.frames.shape == got.frames.shape
        psnr = _psnr(got.frames, want.frames)
        print(f"bucket {frames}x{width}x{height}: PSNR vs single-bucket bundle {psnr:.1f} dB")
        assert psnr >= 40.0
    square = multi.generate(reference=astronaut_png, prompt="a woman smiles", seed=3, height=64, width=64)
    assert square.frames.shape == (9, 64, 64, 3)


@pytest.mark.slow
def test_verify_checks_every_bucket(multi_bundle: Path) -> None:
    reports = verify_bundle(multi_bundle)
    assert all(r.ok for r in reports.values()), reports
    for name in ("dit", "vae_encoder", "vae_decoder"):
        assert reports[name].buckets == BUCKETS


@pytest.mark.slow
def test_three_buckets_cost_at_most_5_percent_more_than_one(multi_bundle: Path, tiny_bundle: Path) -> None:
    one, three = _size(tiny_bundle), _size(multi_bundle)
    print(f"tiny bundle: 1 bucket {one} bytes, 3 buckets {three} bytes ({three / one:.4f}x)")
    assert three <= 1.05 * one


@pytest.mark.slow
def test_missing_size_fails_with_the_bucket_list(multi_bundle: Path, astronaut_png: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.mp4"
    proc = subprocess.run([sys.executable, "-m", "stdrc.cli", "generate", "--bundle", str(multi_bundle),
                           "--ref", str(astronaut_png), "--prompt", "hi", "--frames", "25", "-o", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for label in ("9 frames 96x64", "17 frames 64x96", "9 frames 64x64"):
        assert label in errors[0]
    assert not out.exists() and not list(tmp_path.iterdir())
    with pytest.raises(InputError, match="its buckets are"):
        read_manifest(multi_bundle).find_bucket(9, 96, 96)


def test_format_1_bundle_still_loads(tiny_bundle: Path, tmp_path: Path, astronaut_png: Path) -> None:
    from stdrc.runtime.pipeline import Pipeline

    old = tmp_path / "old"
    shutil.copytree(tiny_bundle, old)
    data = json.loads((old / "manifest.json").read_text())
    data["format"] = 1
    del data["buckets"]
    (old / "manifest.json").write_text(json.dumps(data))
    m = read_manifest(old)
    assert len(m.buckets) == 1 and m.bucket.label() == "9x96x64"
    result = Pipeline.from_bundle(old).generate(reference=astronaut_png, prompt="hi", seed=1, steps=2)
    assert result.frames.shape == (9, 64, 96, 3)


@pytest.mark.parametrize("args,message", [
    (["--bucket", "9x96x64", "--bucket", "17x64x96", "--rope", "baked"], "--rope baked"),
    (["--bucket", "9x96x64", "--frames", "17"], "--bucket and --frames"),
    (["--bucket", "9x96"], "FRAMESxWIDTHxHEIGHT"),
    (["--bucket", "10x96x64"], "not 8k+1"),
    (["--bucket", "9x96x64", "--bucket", "9x96x64"], "twice"),
    (["--bucket", "9x96x64", "--bucket", "17x64x96", "--backend", "torch", "--precision", "bf16"], "bakes"),
])
def test_bad_bucket_arguments_are_one_line(tmp_path: Path, args: list[str], message: str, capsys) -> None:
    """Through `stdrc-export build-engines`'s `main`, in-process (a process per case only re-imports torch;
    tests/runtime/test_reliability.py runs build-engines refusals as processes)."""
    from stdrc.engines.cli import main

    out = tmp_path / "b"
    code = main(["build-engines", "-q", "--out", str(out), "--cache-dir", str(tmp_path / "c"), *args])
    err = capsys.readouterr().err
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err, err
    assert not out.exists()


def test_tensorrt_plan_holds_one_profile_per_bucket(tmp_path: Path) -> None:
    from stdrc.engines.preflight import check_buckets
    from stdrc.engines.tensorrt import plan_for, polygraphy_loaders
    from stdrc.export.config import get_preset
    from stdrc.export.specs import component_specs
    from stdrc.runtime.backends.tensorrt import profile_index

    buckets, tiling, rope = check_buckets(BuildConfig(buckets=BUCKETS))
    assert rope == "input"
    specs = component_specs(get_preset("tiny"), buckets, tiling, rope_input=True)
    for name in ("dit", "vae_encoder", "vae_decoder"):
        plan = plan_for(name, specs[name], "fp16", tmp_path, bucket_dims=specs[name].bucket_dims)
        assert len(plan.all_profiles()) == 3
        described = plan.describe().bucket_profiles
        assert len(described) == 3
        _, config = polygraphy_loaders(plan)
        assert len(config.profiles) == 3
    plan = plan_for("dit", specs["dit"], "fp16", tmp_path, bucket_dims=specs["dit"].bucket_dims)
    for i, (profile, b) in enumerate(zip(plan.bucket_profiles, buckets)):
        lo, opt, hi = profile["latent"]
        assert lo[1] == opt[1] == hi[1] == b.tokens  # min = opt = max at the bucket's token count
        assert (lo[0], hi[0]) == (1, 3)  # the guidance-stream batch stays dynamic
        assert profile["rope_cos"][0] == profile["rope_cos"][2] == (1, b.tokens, 64)
        shapes = {k: (2, *v[1][1:]) if k != "rope_cos" and k != "rope_sin" else v[1] for k, v in profile.items()}
        assert profile_index(plan.describe().bucket_profiles, shapes) == i
    with pytest.raises(Exception, match="fit none"):
        profile_index(plan.describe().bucket_profiles, {"latent": (1, 999, 128)})
