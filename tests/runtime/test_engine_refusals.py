"""Options an engine cannot honour are refused with one line, never ignored; CLI exit codes are exact."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from stdrc.runtime.backends import open_engine
from stdrc.runtime.errors import BundleError, InputError
from stdrc.runtime.manifest import ComponentEntry, TensorSpec, sha256_file
from stdrc.runtime.pipeline import Pipeline
from stdrc.runtime.schema import BuildFacts

SPEC = (TensorSpec("x", (1, 4), "float32"),)


def _entry(backend: str, **build: str) -> ComponentEntry:
    return ComponentEntry(backend, f"dit.{backend}", "0" * 64, "fp32", SPEC, SPEC, build=BuildFacts(**build))


@pytest.mark.parametrize("backend", ["onnxruntime", "tensorrt"])
def test_cuda_graphs_are_refused_outside_torch_and_aoti(backend: str, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="--cuda-graphs needs a torch or aoti bundle"):
        open_engine(tmp_path, "dit", _entry(backend), device="cuda", cuda_graph=True)


def test_cuda_graphs_on_an_onnxruntime_bundle_is_refused_before_loading(tiny_bundle: Path) -> None:
    with pytest.raises(InputError, match="this one is onnxruntime"):
        Pipeline.from_bundle(tiny_bundle, device="cuda", cuda_graphs=True)


@pytest.mark.parametrize("built, asked", [("cuda", "cpu"), ("cpu", "cuda"), (None, "cpu")])
def test_exported_program_on_another_device_is_refused(built: str | None, asked: str, tmp_path: Path) -> None:
    """A .pt2 bakes its build device in: the engine refuses any other before reading the file (no GPU needed)."""
    pytest.importorskip("torch")
    for backend in ("aoti", "torch"):
        entry = _entry(backend, **({"device": built} if built else {}))
        with pytest.raises(BundleError, match=f"not {asked}: rebuild the bundle on a {asked} machine"):
            open_engine(tmp_path, "dit", entry, device=asked, trust_code=True)


def _cli(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=600)


def test_generate_cuda_graphs_on_onnxruntime_exits_2(tiny_bundle: Path, astronaut_png: Path, tmp_path: Path) -> None:
    out = tmp_path / "v.mp4"
    proc = _cli("stdrc.cli", "generate", "--bundle", str(tiny_bundle), "--ref", str(astronaut_png),
                "--prompt", "x", "--device", "cuda", "--cuda-graphs", "-o", str(out), "-q")
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--cuda-graphs" in errors[0] and "Traceback" not in proc.stderr
    assert not out.exists()


@pytest.mark.slow  # a verify of a perturbed copy of the tiny bundle
def test_verify_exit_codes(tiny_bundle: Path, tmp_path: Path, capsys) -> None:
    """2 for bad input (no such bundle), 1 when a component is beyond tolerance (a decoder weight perturbed):
    `stdrc-export verify`'s `main`, whose return value is the process's exit code (`sys.exit(main())`; a process
    of its own per case only re-imported torch: tests/engines/test_bundle.py runs verify as a process)."""
    import onnx
    from onnx import numpy_helper

    from stdrc.engines.cli import main

    assert main(["verify", str(tmp_path / "missing")]) == 2, capsys.readouterr().err
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    path = bundle / "vae_decoder.onnx"
    model = onnx.load(str(path))
    big = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    big.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(big) + np.float32(0.5), big.name))
    onnx.save(model, str(path))
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["components"]["vae_decoder"]["sha256"] = sha256_file(path)  # a consistent bundle, wrong numbers
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    code, out = main(["verify", str(bundle)]), capsys.readouterr()
    assert code == 1, out.out + out.err
    # a component's line: "NAME backend precision errors (tol T) ok|FAIL [buckets ...] vs REFERENCE"
    assert [line.split()[0] for line in out.out.splitlines() if " FAIL" in line] == ["vae_decoder"]
