"""The job registry's bookkeeping and the form parser, in-process (no Ray cluster)."""

from __future__ import annotations

import time

import pytest

from stdrc.runtime.errors import InputError
from stdrc.runtime.options import GenerationOptions
from stdrc.serve.registry import JobRegistry
from stdrc.serve.request import parse_form, safe_name

REQUEST = GenerationOptions(prompt="a woman", steps=2).to_json()


def test_queue_limit_counts_only_waiting_jobs():
    reg = JobRegistry(max_queue=2, keep_s=60)
    a, b = reg.create(REQUEST, b"png", "a.png"), reg.create(REQUEST, b"png", "b.png")
    assert a and b and reg.create(REQUEST, b"png", "c.png") is None
    assert reg.start(a, {"pid": 1}).attempts == 1  # a runs: one place frees up
    assert reg.create(REQUEST, b"png", "c.png") is not None
    assert reg.counts() == {"queued": 2, "running": 1, "done": 0, "failed": 0}


def test_a_job_runs_to_done_with_progress_and_bytes():
    reg = JobRegistry(max_queue=4, keep_s=60)
    job = reg.create(REQUEST, b"png", "a.png")
    assert reg.status(job) == {"id": job, "status": "queued", "step": 0, "steps": 2, "error": None,
                               "facesim": None, "facesim_scored": False}
    assert reg.result(job, "video") is None
    reg.start(job, {"pid": 1})
    reg.progress(job, 1, 2)
    assert reg.status(job)["status"] == "running" and reg.status(job)["step"] == 1
    reg.finish(job, b"mp4", b"sheet", 0.5, scored=True)
    assert reg.status(job) == {"id": job, "status": "done", "step": 2, "steps": 2, "error": None, "facesim": 0.5,
                               "facesim_scored": True}
    assert reg.result(job, "video") == b"mp4" and reg.result(job, "sheet") == b"sheet"
    reg.fail(job, "late")  # a finished job stays finished
    assert reg.status(job)["status"] == "done"


def test_requeued_job_counts_its_attempts_and_can_fail_with_the_reason():
    reg = JobRegistry(max_queue=4, keep_s=60)
    job = reg.create(REQUEST, b"png", "a.png")
    reg.start(job, {"pid": 1})
    reg.requeue(job, "replica died")
    assert reg.status(job)["status"] == "queued" and reg.unfinished() == [job]
    assert reg.start(job, {"pid": 2}).attempts == 2
    reg.fail(job, "replica died, twice")
    assert reg.status(job)["error"] == "replica died, twice"
    assert reg.start(job, {"pid": 3}) is None  # never started again once failed
    assert reg.record(job)["worker"] == {"pid": 2} and "reference" not in reg.record(job)


def test_finished_jobs_and_their_bytes_expire_after_keep_s():
    reg = JobRegistry(max_queue=4, keep_s=0.2)
    done, waiting = reg.create(REQUEST, b"png", "a.png"), reg.create(REQUEST, b"png", "b.png")
    reg.start(done, {})
    reg.finish(done, b"mp4", b"sheet", None)
    time.sleep(0.3)
    assert reg.status(done) is None and reg.result(done, "video") is None and reg.results == {}
    assert reg.status(waiting)["status"] == "queued"  # unfinished jobs never expire


def test_form_fields_parse_into_a_request():
    got = parse_form({"prompt": "p", "negative_prompt": "n", "seed": "3", "steps": "4", "text_scale": "2.5",
                      "ref_scale": "", "face_crop": "false"})
    assert got == GenerationOptions("p", "n", 3, 4, 2.5, None, face_crop=False)
    assert parse_form({"prompt": "p"}) == GenerationOptions("p")
    sized = parse_form({"prompt": "p", "frames": "17", "height": "96", "width": "64"})  # a bundle's bucket
    assert (sized.frames, sized.height, sized.width) == (17, 96, 64)


def test_a_queued_request_round_trips_through_json():
    import json

    options = GenerationOptions("p", "n", 3, 4, 2.5, None, guidance_interval=(0.2, 0.8), face_crop=False,
                                frames=17, height=96, width=64)
    assert GenerationOptions.from_json(json.loads(json.dumps(options.to_json()))) == options
    with pytest.raises(InputError, match="unknown generation option"):
        GenerationOptions.from_json({**options.to_json(), "output": "/tmp/x.mp4"})


@pytest.mark.parametrize(("form", "words"), [
    ({}, "prompt"), ({"prompt": "p", "seed": "1.5"}, "seed"), ({"prompt": "p", "steps": "two"}, "steps"),
    ({"prompt": "p", "ref_scale": "inf"}, "ref_scale"), ({"prompt": "p", "face_crop": "maybe"}, "face_crop"),
    ({"prompt": "p", "fps": "24"}, "fps"), ({"prompt": "p", "width": "6.5"}, "width"),
    ({"prompt": "p", "steps": "0"}, "steps"), ({"prompt": "p", "seed": "-1"}, "seed"),
])
def test_bad_form_fields_name_the_field(form, words):
    with pytest.raises(InputError, match=words):
        parse_form(form)


def test_upload_names_never_become_paths():
    assert safe_name("../../etc/passwd") == "passwd"
    assert safe_name("..") == "reference" and safe_name(None) == "reference"
    assert safe_name("my photo.png") == "my_photo.png"
