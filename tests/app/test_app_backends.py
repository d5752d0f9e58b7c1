"""The page's backends without a browser: Cancel in process, and the `stdrc serve` client.

The `--server` backend runs against the real `stdrc serve` (Ray Serve, one replica, the tiny bundle).
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import imageio.v3 as iio
import pytest

from stdrc.app.backends import Cancelled, Job, LocalBackend
from stdrc.runtime.errors import StdrcError
from stdrc.runtime.options import GenerationOptions
from stdrc.runtime.pipeline import Pipeline

PROMPT = "an astronaut"
STEPS = 30  # enough for the server to report progress while it samples


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
        backend.generate(Job(str(astronaut_png), GenerationOptions(PROMPT, steps=4)), on_step, cancel)
    assert seen == [(1, 4)]
    assert list(tmp_path.iterdir()) == []  # nothing half-written
    done = backend.generate(Job(str(astronaut_png), GenerationOptions(PROMPT, steps=2)), lambda d, t: None,
                            threading.Event())
    assert Path(done.video).is_file() and Path(done.contact_sheet).is_file()  # the lock was released


@pytest.fixture(scope="module")
def server_url(ray_cluster, tiny_bundle):
    """The real `stdrc serve` (Ray Serve, one replica) on the tiny bundle, on the session's Ray cluster."""
    from ray import serve

    from stdrc.serve.app import ServeConfig, deploy, undeploy

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = ServeConfig(bundle=tiny_bundle, replicas=1, port=port, max_queue=4, keep_s=600,
                         app_name="stdrc-app-test")
    try:
        yield deploy(config) + "/"
    finally:
        try:
            undeploy(config)
        finally:
            serve.shutdown()


@pytest.mark.slow  # Ray Serve
def test_server_backend_returns_what_the_pipeline_makes(server_url, pipeline, astronaut_png, tmp_path):
    from stdrc.app.client import ServerBackend
    from stdrc.runtime.video import contact_sheet

    backend, seen = ServerBackend(server_url, tmp_path, poll_s=0.05), []
    job = Job(str(astronaut_png), GenerationOptions(PROMPT, seed=5, steps=STEPS, text_scale=2.0, ref_scale=1.5))
    out = backend.generate(job, lambda d, t: seen.append((d, t)), threading.Event())
    expected = pipeline.generate(astronaut_png, prompt=PROMPT, seed=5, steps=STEPS, text_scale=2.0, ref_scale=1.5)
    assert iio.imread(out.video).shape == expected.frames.shape  # the downloaded video decodes, full size
    sheet = iio.imread(out.contact_sheet)[..., :3].astype(int)  # PNG: lossless, so comparable to the frames
    assert abs(sheet - contact_sheet(expected.frames).astype(int)).max() <= 1
    assert out.facesim == expected.facesim and out.scored == expected.facesim_scored is True
    assert seen and seen == sorted(seen) and {t for _, t in seen} == {STEPS}  # progress as the server reports it


@pytest.mark.slow  # Ray Serve
def test_server_backend_shows_the_servers_error_line(server_url, blank_png, tmp_path):
    from stdrc.app.client import ServerBackend

    with pytest.raises(StdrcError, match=r"^no face found in the reference image"):
        ServerBackend(server_url, tmp_path, poll_s=0.05).generate(
            Job(str(blank_png), GenerationOptions(PROMPT, steps=2)), lambda d, t: None, threading.Event())


def test_server_backend_unreachable_is_one_line(astronaut_png, tmp_path):
    from stdrc.app.client import ServerBackend
    from stdrc.runtime.client import ServerError

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket closes
    with pytest.raises(ServerError, match="cannot reach .*is `stdrc serve` running there") as e:
        ServerBackend(f"http://127.0.0.1:{port}", tmp_path).generate(
            Job(str(astronaut_png), GenerationOptions(PROMPT)), lambda d, t: None, threading.Event())
    assert "\n" not in str(e.value)
