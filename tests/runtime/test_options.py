"""One request path: `GenerationOptions` is the one list of generation fields, and `Pipeline.prepare`
the one validation, so the CLI, the job API, the app and the C++ inputs agree.

A field added to a GenerationOptions subclass shows up in the CLI's flags, the serve form and the
app's inputs with no other change; the same request through each front end prepares the same bucket,
scales and sigmas as the C++ runner's inputs record.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from stdrc.cli import build_parser
from stdrc.runtime.cli import FORMATTER, add_generation_flags, options_from_args
from stdrc.runtime.errors import InputError
from stdrc.runtime.options import FORM_FIELDS, GenerationOptions, knob, options_of, served
from stdrc.runtime.pipeline import Pipeline


@dataclass(frozen=True)
class WithMotion(GenerationOptions):
    """A new generation field, declared once."""

    motion: float = knob("how much the person moves", 1.0, lo=0.0, hi=2.0, served=True, app="Motion")


@pytest.fixture(scope="module")
def checks(tiny_bundle: Path) -> Pipeline:
    return Pipeline.for_checks(tiny_bundle)


def test_a_new_field_reaches_the_cli_the_serve_form_and_the_client(tmp_path: Path) -> None:
    from stdrc.serve.request import parse_form

    parser = argparse.ArgumentParser(formatter_class=FORMATTER)
    add_generation_flags(parser, WithMotion)
    text = parser.format_help()
    assert "--motion MOTION" in text and "how much the person moves (default: 1.0)" in text
    out = str(tmp_path / "v.mp4")
    got = options_from_args(parser.parse_args(["--prompt", "p", "-o", out, "--motion", "1.5"]), WithMotion)
    assert isinstance(got, WithMotion) and got.motion == 1.5
    with pytest.raises(InputError, match=r"motion=3\.0: use a finite number in \[0, 2\]"):
        options_from_args(parser.parse_args(["--prompt", "p", "-o", out, "--motion", "3"]), WithMotion)

    assert "motion" in {o.name for o in served(WithMotion)}
    assert parse_form({"prompt": "p", "motion": "0.5"}, WithMotion) == WithMotion("p", motion=0.5)
    with pytest.raises(InputError, match="motion"):
        parse_form({"prompt": "p", "motion": "fast"}, WithMotion)
    assert WithMotion("p", motion=0.5).form() == {"prompt": "p", "motion": "0.5"}  # what the client posts
    assert WithMotion.from_json(json.loads(json.dumps(WithMotion("p", motion=0.5).to_json()))).motion == 0.5


def test_a_new_field_reaches_the_app_inputs(checks: Pipeline, tmp_path: Path) -> None:
    pytest.importorskip("gradio")
    from stdrc.app.backends import LocalBackend
    from stdrc.app.page import Page, build_page

    page = Page(LocalBackend(checks, tmp_path), checks.manifest, checks, options_type=WithMotion)
    demo = build_page(page)
    inputs = {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None)}
    assert inputs["motion"].label == "Motion" and inputs["motion"].value == 1.0
    assert inputs["steps"].value == checks.manifest.sampler.steps  # None in the options: the bundle's value
    assert page.options({"prompt": "p", "motion": 0.25, "seed": 4.0, "face_crop": True}) == \
        WithMotion("p", seed=4, motion=0.25)
    assert checks.engines.loaded() == []  # the page's preview never opened an engine


def test_a_new_field_reaches_the_cpp_inputs(tiny_bundle: Path, astronaut_png: Path, tmp_path: Path) -> None:
    """The runner's inputs.json records the new field as the serve form parsed it, bundle defaults filled in."""
    from stdrc.runtime.cpp_inputs import INPUTS_JSON, write_cpp_inputs
    from stdrc.serve.request import parse_form

    pipe = Pipeline.from_bundle(tiny_bundle, prompt_cache=None)
    request = parse_form({"prompt": "p", "motion": "0.5", "seed": "3"}, WithMotion)
    meta = json.loads((write_cpp_inputs(pipe, astronaut_png, request, tmp_path) / INPUTS_JSON).read_text())
    assert meta["options"]["motion"] == 0.5 and meta["seed"] == 3
    assert WithMotion.from_json(meta["options"]) == pipe.prepare(astronaut_png, request).options


def test_every_field_is_offered_where_its_knob_says(checks: Pipeline, tmp_path: Path) -> None:
    (sub,) = (a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    generate = sub.choices["generate"].format_help()
    for option in options_of(GenerationOptions):
        assert option.flag in generate, option.name
        assert (option.name in FORM_FIELDS) == option.knob.served, option.name
    pytest.importorskip("gradio")
    from stdrc.app.backends import LocalBackend
    from stdrc.app.page import Page, build_page

    demo = build_page(Page(LocalBackend(checks, tmp_path), checks.manifest, checks))
    ids = {getattr(b, "elem_id", None) for b in demo.blocks.values()}
    assert {o.name for o in options_of(GenerationOptions) if o.knob.app} <= ids


def test_cli_serve_app_and_cpp_inputs_prepare_the_same_request(tiny_bundle: Path, checks: Pipeline,
                                                               astronaut_png: Path, tmp_path: Path) -> None:
    from stdrc.runtime.cpp_inputs import INPUTS_JSON, SIGMAS, write_cpp_inputs
    from stdrc.serve.request import parse_form

    b = checks.manifest.bucket
    cli = options_from_args(build_parser().parse_args([
        "generate", "--bundle", str(tiny_bundle), "--ref", str(astronaut_png), "-o", str(tmp_path / "v.mp4"),
        "--prompt", "a woman", "--negative-prompt", "blur", "--seed", "7", "--steps", "3", "--text-scale", "2.5",
        "--ref-scale", "1.5", "--frames", str(b.frames), "--height", str(b.height), "--width", str(b.width)]))
    form = {"prompt": "a woman", "negative_prompt": "blur", "seed": "7", "steps": "3", "text_scale": "2.5",
            "ref_scale": "1.5", "face_crop": "true", "frames": str(b.frames), "height": str(b.height),
            "width": str(b.width)}
    serve = parse_form(form)
    assert parse_form(serve.form()) == serve  # what the client and `stdrc submit` post
    assert GenerationOptions.from_json(cli.to_json()) == serve  # the same request, the output path aside

    prepared = checks.prepare(astronaut_png, cli)
    assert prepared.bucket == b and (prepared.options.steps, len(prepared.sigmas)) == (3, 4)
    assert (prepared.scales.text, prepared.scales.ref) == (2.5, 1.5)
    from_serve = checks.prepare(astronaut_png, serve)
    assert from_serve.scales == prepared.scales and from_serve.bucket == prepared.bucket
    np.testing.assert_array_equal(from_serve.sigmas, prepared.sigmas)
    np.testing.assert_array_equal(from_serve.image, prepared.image)
    from stdrc.app.backends import LocalBackend
    from stdrc.app.page import Page

    app = Page(LocalBackend(checks, tmp_path), checks.manifest, checks).options(
        {"prompt": "a woman", "negative_prompt": "blur", "seed": 7, "steps": 3, "text_scale": 2.5, "ref_scale": 1.5,
         "face_crop": True})  # the page has no size input: the bundle's default bucket
    assert checks.prepare(astronaut_png, app).options == from_serve.options

    pipe = Pipeline.from_bundle(tiny_bundle, prompt_cache=None)
    folder = write_cpp_inputs(pipe, astronaut_png, serve, tmp_path / "cpp")
    np.testing.assert_array_equal(np.load(folder / SIGMAS), prepared.sigmas)
    meta = json.loads((folder / INPUTS_JSON).read_text())
    assert meta["bucket"] == prepared.bucket.label() and meta["seed"] == 7
    assert meta["guidance"] == {"text_scale": 2.5, "ref_scale": 1.5, "rescale": 0.0, "interval": None}
    assert meta["options"] == from_serve.options.to_json() == prepared.options.to_json()  # output aside


def test_prepare_refuses_before_any_engine_and_fills_the_bundles_defaults(checks: Pipeline, astronaut_png: Path,
                                                                         blank_png: Path) -> None:
    prepared = checks.prepare(astronaut_png, GenerationOptions("p"))
    g, s = checks.manifest.guidance, checks.manifest.sampler
    assert (prepared.options.text_scale, prepared.options.ref_scale) == (g.text_scale, g.ref_scale)
    assert prepared.options.steps == s.steps == len(prepared.sigmas) - 1
    np.testing.assert_array_equal(prepared.sigmas, np.array(s.sigmas, np.float32))  # the manifest's own
    assert prepared.facesim_scored  # an ONNX face encoder and a face crop
    assert not checks.prepare(astronaut_png, GenerationOptions("p", face_crop=False)).facesim_scored
    for options, words in ((GenerationOptions("p", frames=17), "no bucket of 17 frames"),
                           (GenerationOptions("p"), "no face found")):
        with pytest.raises(InputError, match=words):
            checks.prepare(blank_png if words == "no face found" else astronaut_png, options)
    assert checks.engines.loaded() == [] and checks.engines.opened == []


def test_a_bad_request_is_refused_before_the_bundle_is_hashed(tiny_bundle: Path, astronaut_png: Path,
                                                              tmp_path: Path) -> None:
    """`prepare` runs before any bundle file is hashed or read; a changed file is still refused before use."""
    import os
    import shutil

    from stdrc.runtime.errors import BundleError

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle, copy_function=os.link)
    (bundle / "dit.onnx").unlink()  # a hard link would change the shared bundle
    data = bytearray((tiny_bundle / "dit.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bundle / "dit.onnx").write_bytes(bytes(data))
    pipe = Pipeline.from_bundle(bundle, prompt_cache=None)  # presence and containment only
    with pytest.raises(InputError, match="does not exist"):
        pipe.generate(tmp_path / "missing.png", prompt="p", steps=1)
    with pytest.raises(BundleError, match="dit.onnx does not match its sha256"):
        pipe.generate(astronaut_png, prompt="p", steps=1)
    assert pipe.engines.opened == [] and not list(tmp_path.glob("*.mp4"))
