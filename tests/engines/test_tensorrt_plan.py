"""TensorRT build plans: the plain data is tested here; the build itself needs TensorRT and a GPU.

What runs in this environment (no TensorRT, no GPU): optimization profiles from the real
component specs of the tiny bucket, precision -> strong typing / builder flags, the engine cache
key, plan file names, invalid settings, the manifest build-fact checks of the runtime engine, and
the real BackendUnavailableError raised by `build_engine` and `TensorRTEngine` when `tensorrt`
cannot be imported (no mocks).
What does not run here: the tests marked `trt` (ONNX -> plan build with the TensorRT 10/11 API,
and executing it with cuda-python buffers). They skip because TensorRT is not installable in
this environment; they are written to run as-is on a machine with TensorRT and an NVIDIA GPU.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from stdrc.engines.tensorrt import build_engine, engine_cache_key, plan_for, polygraphy_loaders, profile_shapes
from stdrc.export.config import get_preset
from stdrc.export.errors import ExportError
from stdrc.export.specs import component_specs
from stdrc.runtime.backends.tensorrt import TensorRTEngine, check_build, normalize_capability
from stdrc.runtime.errors import BackendUnavailableError, BundleError
from stdrc.runtime.manifest import Bucket, ComponentEntry, TensorSpec
from stdrc.runtime.schema import BuildFacts

HAS_TRT = importlib.util.find_spec("tensorrt") is not None
TRT_SKIP = "TensorRT is not installable in this environment (PyPI's tensorrt packages are download stubs)"


@pytest.fixture(scope="module")
def preset():
    return get_preset("tiny")


@pytest.fixture(scope="module")
def bucket(preset):
    return Bucket(**preset.default_bucket)


@pytest.fixture(scope="module")
def specs(preset, bucket):
    return component_specs(preset, bucket)


def test_dit_profile_is_batch_1_to_3_opt_3(specs, bucket, preset):
    profiles = profile_shapes(specs["dit"].inputs, specs["dit"].dynamic_dims)
    n, length = bucket.tokens, bucket.text_length
    assert n == 18 and length == 16
    assert profiles == {
        "latent": ((1, n, 128), (3, n, 128), (3, n, 128)),
        "timestep": ((1, n), (3, n), (3, n)),
        "context": ((1, length, preset.dit.caption_channels), (3, length, preset.dit.caption_channels),
                    (3, length, preset.dit.caption_channels)),
        "context_mask": ((1, length), (3, length), (3, length)),
        "attn_mask": ((1, n), (3, n), (3, n)),
    }


@pytest.mark.parametrize("name", ["text_gemma", "text_head", "vae_encoder", "vae_decoder"])
def test_static_components_have_fixed_profiles(specs, name):
    profiles = profile_shapes(specs[name].inputs, specs[name].dynamic_dims)
    assert set(profiles) == {t.name for t in specs[name].inputs}
    for (lo, opt, hi), spec in zip(profiles.values(), specs[name].inputs, strict=True):
        assert lo == opt == hi == spec.shape


def test_profiles_from_manifest_entry_equal_spec(specs, tmp_path):
    spec = specs["face_encoder"]
    entry = ComponentEntry("tensorrt", "face_encoder.plan", "0" * 64, "fp16", spec.inputs, spec.outputs,
                           dynamic_dims=spec.dynamic_dims)
    assert plan_for("face_encoder", entry, "fp16", tmp_path).profiles == plan_for(
        "face_encoder", spec, "fp16", tmp_path).profiles == {"image": ((1, 3, 112, 112), (16, 3, 112, 112),
                                                                      (64, 3, 112, 112))}


def test_unknown_or_bad_symbolic_dim():
    with pytest.raises(ExportError, match="'frames'.*add it to the component spec"):
        profile_shapes((TensorSpec("x", ("frames", 4), "float32"),), {"batch": [1, 2, 3]})
    with pytest.raises(ExportError, match="min <= opt <= max"):
        profile_shapes((TensorSpec("x", ("batch", 4), "float32"),), {"batch": [2, 1, 3]})


@pytest.mark.parametrize("precision,typed,flags", [
    ("fp8", True, ()), ("fp16", False, ("FP16",)), ("bf16", False, ("BF16",)), ("fp32", False, ()),
])
def test_precision_sets_typing_and_flags(specs, tmp_path, precision, typed, flags):
    plan = plan_for("dit", specs["dit"], precision, tmp_path)
    assert plan.strongly_typed is typed and plan.flags == flags
    assert plan.optimization_level == 3 and plan.workspace_bytes is None and plan.timing_cache is None


def test_strongly_typed_half_has_no_flags(specs, tmp_path):
    plan = plan_for("dit", specs["dit"], "bf16", tmp_path, strongly_typed=True)
    assert plan.strongly_typed and plan.flags == ()
    with pytest.raises(ExportError, match="strongly typed"):
        plan_for("dit", specs["dit"], "fp8", tmp_path, strongly_typed=False)


def test_plan_file_names(specs, tmp_path):
    plan = plan_for("dit", specs["dit"], "fp8", tmp_path / "bundle", timing_cache=tmp_path / "trt.cache",
                    workspace_bytes=8 << 30, optimization_level=5)
    assert plan.plan_path == tmp_path / "bundle" / "dit.plan"
    assert plan.onnx_path == tmp_path / "bundle" / "dit.onnx"
    assert plan.timing_cache == tmp_path / "trt.cache"
    other = plan_for("dit", specs["dit"], "fp16", tmp_path, onnx_path=tmp_path / "cache" / "x.onnx")
    assert other.onnx_path == tmp_path / "cache" / "x.onnx" and other.plan_path == tmp_path / "dit.plan"
    facts = plan.describe()
    assert facts.builder_flags == () and facts.strongly_typed
    assert facts.builder_optimization_level == 5
    assert facts.to_json()["profiles"]["latent"] == [[1, 18, 128], [3, 18, 128], [3, 18, 128]]
    assert str(tmp_path) not in str(facts.to_json())
    assert BuildFacts.from_json(facts.to_json(), "build") == facts  # the manifest reads back what was written


@pytest.mark.parametrize("kwargs,match", [
    ({"precision": "int8"}, "fp16, bf16 or fp8"),
    ({"precision": "fp16", "optimization_level": 6}, "outside 0..5"),
    ({"precision": "fp16", "workspace_bytes": 0}, "must be > 0"),
])
def test_invalid_settings(specs, tmp_path, kwargs, match):
    precision = kwargs.pop("precision")
    with pytest.raises(ExportError, match=match):
        plan_for("dit", specs["dit"], precision, tmp_path, **kwargs)


def test_cache_key_tracks_what_produced_the_plan(specs, tmp_path):
    plan = plan_for("dit", specs["dit"], "fp8", tmp_path)
    key = engine_cache_key("a" * 64, plan, "10.13.0", (9, 0))
    assert key.startswith("dit-fp8-trt10.13.0-sm90-")
    assert key == engine_cache_key("a" * 64, plan, "10.13.0", "9.0")
    moved = replace(plan, plan_path=tmp_path / "elsewhere.plan", onnx_path=tmp_path / "other.onnx")
    assert key == engine_cache_key("a" * 64, moved, "10.13.0", "9.0")
    variants = {
        engine_cache_key("b" * 64, plan, "10.13.0", "9.0"),
        engine_cache_key("a" * 64, plan, "10.14.1", "9.0"),
        engine_cache_key("a" * 64, plan, "10.13.0", "8.9"),
        engine_cache_key("a" * 64, replace(plan, optimization_level=4), "10.13.0", "9.0"),
        engine_cache_key("a" * 64, plan_for("dit", specs["dit"], "fp16", tmp_path), "10.13.0", "9.0"),
    }
    assert key not in variants and len(variants) == 5


@pytest.mark.parametrize("precision,typed", [("fp16", False), ("bf16", False), ("bf16", True), ("fp8", True),
                                            ("fp32", False)])
def test_polygraphy_loaders_carry_the_plan(specs, tmp_path, precision, typed):
    """polygraphy builds its loaders without TensorRT: the network/config they would build is checked here."""
    cache = tmp_path / "trt.cache"
    cache.write_bytes(b"cache")  # loaded only when it exists
    plan = plan_for("dit", specs["dit"], precision, tmp_path, timing_cache=cache, optimization_level=4,
                    strongly_typed=typed)
    network, config = polygraphy_loaders(plan, memory_pool_limits={"WORKSPACE": 1 << 30})
    assert network.path == str(plan.onnx_path) and network.strongly_typed is typed
    assert len(config.profiles) == 1
    profile = config.profiles[0]
    assert list(profile.keys()) == list(plan.profiles)
    for name, (lo, opt, hi) in plan.profiles.items():
        assert (profile[name].min, profile[name].opt, profile[name].max) == (lo, opt, hi)
    assert config.fp16 is (plan.flags == ("FP16",)) and config.bf16 is (plan.flags == ("BF16",))
    assert not config.tf32 and not config.int8 and not config.fp8  # fp8 comes from the Q/DQ graph, typed
    assert config.builder_optimization_level == 4 and config.memory_pool_limits == {"WORKSPACE": 1 << 30}
    assert config.timing_cache_path == str(cache)
    cache.unlink()
    assert polygraphy_loaders(plan)[1].timing_cache_path is None  # a first build starts without one


def _entry(build: dict) -> ComponentEntry:
    spec = TensorSpec("x", (1,), "float32")
    return ComponentEntry("tensorrt", "dit.plan", "0" * 64, "fp8", (spec,), (spec,),
                          build=BuildFacts.from_json(build, "build"))


def test_runtime_refuses_other_trt_version_or_gpu():
    built = {"tensorrt_version": "10.13.0", "compute_capability": "8.9", "gpu_name": "NVIDIA L40S"}
    h100 = {"compute_capability": "9.0", "gpu_name": "NVIDIA H100"}
    check_build(_entry(built), "10.13.0", {"compute_capability": "8.9"})
    with pytest.raises(BundleError, match="built with TensorRT 10.13.0 and this machine has 10.14.1"):
        check_build(_entry(built), "10.14.1", {"compute_capability": "8.9"})
    gpu_msg = r"compute capability 8.9 \(NVIDIA L40S\).*NVIDIA H100.*rebuild the bundle on this GPU"
    with pytest.raises(BundleError, match=gpu_msg):
        check_build(_entry(built), "10.13.0", h100)
    with pytest.raises(BundleError, match="records no TensorRT version"):
        check_build(_entry({}), "10.13.0", h100)
    assert normalize_capability((12, 0)) == normalize_capability("12") == "12.0"


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed here: the missing-package error cannot occur")
def test_build_engine_without_tensorrt_says_so(specs, tmp_path):
    plan = plan_for("dit", specs["dit"], "fp16", tmp_path)
    msg = "TensorRT is not installable here.*install `tensorrt` on a machine with an NVIDIA GPU"
    with pytest.raises(BackendUnavailableError, match=msg):
        build_engine(plan)
    with pytest.raises(BackendUnavailableError, match="TensorRT is not installable here"):
        TensorRTEngine(tmp_path / "dit.plan", _entry({}))


def test_trt_modules_import_without_torch_or_tensorrt():
    code = ("import sys, stdrc.runtime.backends.tensorrt, stdrc.engines.tensorrt as t; "
            "from stdrc.export.config import get_preset; from stdrc.export.specs import component_specs; "
            "from stdrc.runtime.manifest import Bucket; p = get_preset('tiny'); "
            "spec = component_specs(p, Bucket(**p.default_bucket))['dit']; "
            "t.polygraphy_loaders(t.plan_for('dit', spec, 'fp16', '.')); "
            "bad = {'torch', 'tensorrt', 'cuda'} & set(sys.modules); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


def _tiny_dit_onnx(preset, bucket, specs, out: Path, fp8: bool):
    """The tiny DiT (RoPE baked) written to `out` as ONNX: fp32, or FP8 Q/DQ calibrated with modelopt."""
    from stdrc.export.dit import DIT_INPUTS, BakedRopeDiT, build_dit
    from stdrc.export.onnx_export import export_onnx
    from stdrc.export.reference import token_positions
    from stdrc.export.rope import rope_tables

    dit = build_dit(preset.dit, seed=0)
    grid = (bucket.latent_frames, bucket.latent_height, bucket.latent_width)
    rope = rope_tables(token_positions(grid, "tass", bucket.fps), preset.dit)
    if not fp8:
        module = BakedRopeDiT(dit, rope.cos, rope.sin).eval()
        export_onnx(module, specs["dit"], out, attention="onnx")  # TensorRT takes no com.microsoft op
        return module
    from stdrc.calibration.capture import random_dit_batches
    from stdrc.calibration.fp8 import export_qdq_onnx, quantize_dit_fp8

    batches = random_dit_batches(preset, bucket, n=4, seed=0)
    module = BakedRopeDiT(quantize_dit_fp8(dit, batches), rope.cos, rope.sin).eval()
    export_qdq_onnx(module, out, {k: batches[0][k] for k in DIT_INPUTS}, batch_range=(1, 3))
    return module


@pytest.mark.trt
@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, True], ids=["half", "fp8"])
def test_build_and_run_tiny_dit_plan(preset, bucket, specs, tmp_path, fp8):
    trt = pytest.importorskip("tensorrt", reason=TRT_SKIP)
    pytest.importorskip("cuda", reason="cuda-python is needed to run plans: pip install 'stdrc[gpu]'")
    import torch

    from stdrc.calibration.fp8 import rel_l2
    from stdrc.engines.tensorrt import gpu_facts_for_build
    from stdrc.runtime.manifest import sha256_file

    if fp8 and float(gpu_facts_for_build()["compute_capability"]) < 8.9:
        pytest.skip("FP8 plans need compute capability 8.9 or newer")
    spec = specs["dit"]
    module = _tiny_dit_onnx(preset, bucket, specs, tmp_path / "dit.onnx", fp8)
    precision = "fp8" if fp8 else ("fp16" if hasattr(trt.BuilderFlag, "FP16") else "fp32")
    plan = plan_for("dit", spec, precision, tmp_path, onnx_path=tmp_path / "dit.onnx",
                    timing_cache=tmp_path / "timing.cache")
    facts = build_engine(plan)
    assert plan.plan_path.is_file() and plan.timing_cache.is_file()
    assert facts.tensorrt_version == trt.__version__ and facts.strongly_typed is fp8
    entry = ComponentEntry("tensorrt", plan.plan_path.name, sha256_file(plan.plan_path), precision,
                           spec.inputs, spec.outputs, dynamic_dims=spec.dynamic_dims, build=facts)
    for batch in (3, 1):
        feeds = spec.sample_inputs(seed=0, batch=batch)
        with torch.no_grad():
            ref = module(*(torch.from_numpy(feeds[t.name]) for t in spec.inputs)).numpy()
        with TensorRTEngine(plan.plan_path, entry) as engine:
            first = engine.run(feeds)["velocity"]
            again = engine.run(feeds)["velocity"]
        assert first.shape == ref.shape and (first == again).all()
        assert rel_l2(first, ref) < 2e-2
