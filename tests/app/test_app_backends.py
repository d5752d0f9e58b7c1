"""The page's backends without a browser: Cancel in process, and the `stdrc serve` client.

The client runs against a small local stand-in for `stdrc serve` that implements the job API
as the app's brief states it over a real `Pipeline` on the tiny bundle; it is not the real
server (see the README: the client is not tested end to end against `stdrc serve`).
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from pathlib import Path

import imageio.v3 as iio
import pytest
from fastapi import FastAPI, File, Form, UploadFile  # module level: the routes' hints are resolved here
from fastapi.responses import FileResponse, JSONResponse

from stdrc.app.backends import Cancelled, Job, LocalBackend, Outcome
from stdrc.runtime.errors import StdrcError
from stdrc.runtime.pipeline import Pipeline

PROMPT = "an astronaut"


@pytest.fixture(scope="module")
def pipeline(tiny_bundle):
    return Pipeline.from_bundle(tiny_bundle)


def test_cancel_stops_sampling_after_the_current_step(pipeline, astronaut_png, tmp_path):
    backend = LocalBackend(pipeline, tmp_path)
    cancel, seen = threading.Event(), []

    def on_step(done: int, total: int) -> None:
        seen.append((done, total))
        cancel.set()  # as if Cancel were pressed during step 1

    with pytest.raises(Cancelled, match="cancelled after 2 of 4 steps"):
        backend.generate(Job(str(astronaut_png), PROMPT, steps=4), on_step, cancel)
    assert seen == [(1, 4)]
    assert list(tmp_path.iterdir()) == []  # nothing half-written
    done = backend.generate(Job(str(astronaut_png), PROMPT, steps=2), lambda d, t: None, threading.Event())
    assert Path(done.video).is_file() and Path(done.contact_sheet).is_file()  # the lock was released


def stub_server(pipeline: Pipeline, folder: Path):  # noqa: ANN201
    """The job API of `stdrc serve` (as the brief gives it) over one Pipeline, one job at a time."""
    app, jobs, lock = FastAPI(), {}, threading.Lock()

    def run(job_id: str, ref: Path, kwargs: dict) -> None:
        state = jobs[job_id]
        try:
            with lock:
                state["status"] = "running"
                result = pipeline.generate(ref, output=folder / f"{job_id}.mp4",
                                           on_step=lambda i, n: state.update(step=i + 1, steps=n), **kwargs)
            state.update(status="done", facesim=result.facesim, files=result.files)
        except StdrcError as e:
            state.update(status="failed", error=str(e))

    @app.post("/v1/generations", status_code=202)
    def submit(reference: UploadFile = File(...), prompt: str = Form(...), negative_prompt: str = Form(""),  # noqa: B008
               seed: int = Form(0), steps: int | None = Form(None), text_scale: float | None = Form(None),  # noqa: B008
               ref_scale: float | None = Form(None)):  # noqa: B008
        job_id = uuid.uuid4().hex
        ref = folder / f"{job_id}_{reference.filename}"
        ref.write_bytes(reference.file.read())
        jobs[job_id] = {"status": "queued", "step": None, "steps": None, "error": None, "facesim": None}
        kwargs = dict(prompt=prompt, negative_prompt=negative_prompt, seed=seed, steps=steps,
                      text_scale=text_scale, ref_scale=ref_scale)
        threading.Thread(target=run, args=(job_id, ref, kwargs), daemon=True).start()
        return {"id": job_id}

    @app.get("/v1/generations/{job_id}")
    def status(job_id: str):
        if job_id not in jobs:
            return JSONResponse({"error": f"no job {job_id}"}, status_code=404)
        return {k: v for k, v in jobs[job_id].items() if k != "files"}

    @app.get("/v1/generations/{job_id}/video")
    def video(job_id: str):
        return FileResponse(jobs[job_id]["files"]["video"])

    @app.get("/v1/generations/{job_id}/sheet")
    def sheet(job_id: str):
        return FileResponse(jobs[job_id]["files"]["contact_sheet"])

    return app


@pytest.fixture(scope="module")
def server_url(pipeline, tmp_path_factory):
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(stub_server(pipeline, tmp_path_factory.mktemp("serve")),
                                           host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "stub server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/"
    server.should_exit = True
    thread.join(timeout=10)
    assert not thread.is_alive()


def test_server_client_returns_what_the_pipeline_makes(server_url, pipeline, astronaut_png, tmp_path):
    from stdrc.app.client import ServerClient

    client, seen = ServerClient(server_url, tmp_path, poll_s=0.05), []
    job = Job(str(astronaut_png), PROMPT, seed=5, steps=2, text_scale=2.0, ref_scale=1.5)
    out = client.generate(job, lambda d, t: seen.append((d, t)), threading.Event())
    assert isinstance(out, Outcome)
    expected = pipeline.generate(astronaut_png, PROMPT, seed=5, steps=2, text_scale=2.0, ref_scale=1.5)
    frames = iio.imread(out.video)  # the downloaded video decodes, at the bundle's size
    assert frames.shape == expected.frames.shape
    assert iio.imread(out.contact_sheet).ndim == 3
    assert out.facesim == expected.facesim
    assert seen and seen[-1] == (2, 2) and seen == sorted(seen)


def test_server_client_shows_the_servers_error_line(server_url, blank_png, tmp_path):
    from stdrc.app.client import ServerClient

    with pytest.raises(StdrcError, match=r"^no face found in the reference image"):
        ServerClient(server_url, tmp_path, poll_s=0.05).generate(Job(str(blank_png), PROMPT, steps=2),
                                                                 lambda d, t: None, threading.Event())


def test_server_client_unreachable_is_one_line(astronaut_png, tmp_path):
    from stdrc.app.client import ServerClient, ServerError

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket closes
    with pytest.raises(ServerError, match="unreachable .*start `stdrc serve` there or fix --server") as e:
        ServerClient(f"http://127.0.0.1:{port}", tmp_path).generate(Job(str(astronaut_png), PROMPT),
                                                                    lambda d, t: None, threading.Event())
    assert "\n" not in str(e.value)
