"""The package works on its own: installed (not editable) into a folder of its own, run from a temp cwd
with an empty HOME and no STDRC_YUNET, it generates with the face crop and scores FaceSim using the
detector shipped inside it; no file under the repo or under ../shared is opened.

What "opened" covers: every open through Python (an audit hook: the sha256 check of the packaged
YuNet, images, the manifest, ...) plus the YuNet path handed to OpenCV, which opens it in C++.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "stdrc", "export", "engines", "calibration", "runtime", "serve", "app")

# Runs in the child: records every file Python opens (audit hook), then runs the CLI commands given.
CHILD = r"""
import json, os, sys
opened = []
def hook(event, args):
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        opened.append(os.path.realpath(os.fsdecode(args[0])))
sys.addaudithook(hook)
import stdrc
from stdrc.runtime import face
from stdrc.cli import main
codes = [main(argv) for argv in json.loads(sys.argv[1])]
json.dump({"codes": codes, "stdrc": stdrc.__file__, "yunet": str(face.find_yunet()), "opened": opened,
           "torch": "torch" in sys.modules}, open(os.environ["CHILD_REPORT"], "w"))
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`pip install --target` of a copy of the sources: a real installed package, away from the repo."""
    src, site = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("site")
    for name in SOURCES:
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__", "build*")}
                                         if (ROOT / name).is_dir() else {}))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(src)], check=True, capture_output=True, timeout=600)
    return site


@pytest.mark.slow  # installs a copy
def test_installed_package_runs_without_repo_or_shared(installed: Path, tiny_bundle: Path, astronaut_png: Path,
                                                       tmp_path: Path) -> None:
    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir(), home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("STDRC_YUNET", "PYTHONPATH")}
    env.update(HOME=str(home), PYTHONPATH=str(installed), CHILD_REPORT=str(tmp_path / "report.json"))
    commands = [
        ["generate", "--bundle", str(tiny_bundle), "--ref", str(astronaut_png), "--prompt", "a woman waves",
         "--steps", "2", "-o", "out.mp4", "-q"],
        ["facesim", "out.mp4", "--ref", str(astronaut_png), "--embedder", str(tiny_bundle / "face_encoder.onnx")],
    ]
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(commands)], cwd=work, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["codes"] == [0, 0], proc.stdout + proc.stderr
    assert (work / "out.mp4").is_file() and "facesim " in proc.stdout
    assert Path(report["stdrc"]).is_relative_to(installed)  # the installed copy, not the repo's
    assert Path(report["yunet"]).is_relative_to(installed)  # the detector shipped in the package
    assert str(Path(report["yunet"]).resolve()) in report["opened"]  # read (sha256 check) from there
    assert not report["torch"]  # the ONNX Runtime path, face crop and FaceSim included
    shared, venv = (ROOT.parent / "shared").resolve(), Path(sys.prefix).resolve()
    stray = [p for p in report["opened"] if Path(p).is_relative_to(shared)
             or (Path(p).is_relative_to(ROOT.resolve()) and not Path(p).is_relative_to(venv))]
    assert not stray, stray


def test_public_api_without_torch() -> None:
    code = ("import sys, stdrc\n"
            "assert 'stdrc.runtime.pipeline' not in sys.modules  # import stdrc stays light\n"
            "from stdrc import Pipeline\n"
            "from stdrc.runtime import Pipeline as P2, GenerationResult\n"
            "from stdrc.runtime.pipeline import Pipeline as P3\n"
            "assert Pipeline is P2 is P3 and callable(Pipeline.from_bundle)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'ltx_core', 'onnx')))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
    with pytest.raises(AttributeError, match="no attribute 'Pipline'"):
        import stdrc

        stdrc.Pipline  # noqa: B018
