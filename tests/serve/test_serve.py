"""`stdrc serve` on a simulated two-node Ray cluster: the tiny bundle, two replicas, the v1 job API over HTTP."""

from __future__ import annotations

import os
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("ray.serve")
pytest.importorskip("multipart")

import ray
import requests
from ray import serve

from stdrc.cli import main
from stdrc.runtime.client import Client, ServerError
from stdrc.runtime.manifest import read_manifest
from stdrc.runtime.video import read_video
from stdrc.serve.app import ServeConfig, deploy, undeploy
from stdrc.serve.registry import get_registry

pytestmark = pytest.mark.slow
SLOW_STEPS = 300  # about a second a job on this VM's tiny bundle: long enough to fill the queue or kill mid-job


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(ray_cluster, tiny_bundle: Path):
    """On the session's two nodes of 2 CPUs: a replica reserves 2, so each node holds exactly one."""
    config = ServeConfig(bundle=tiny_bundle, replicas=2, port=_free_port(), max_queue=3, keep_s=600,
                         cpus_per_replica=2)
    try:
        url = deploy(config)
        yield Client(url), config
    finally:
        try:
            undeploy(config)
        finally:
            serve.shutdown()


def _frames(tiny_bundle: Path) -> int:
    return read_manifest(tiny_bundle).bucket.frames


def _record(config: ServeConfig, job_id: str) -> dict:
    return ray.get(get_registry(config.app_name).record.remote(job_id))


def _check_outputs(client: Client, job_id: str, frames: int, tmp_path: Path) -> None:
    video = tmp_path / f"{job_id}.mp4"
    video.write_bytes(client.video(job_id))
    assert read_video(video).shape[0] == frames
    sheet = cv2.imdecode(np.frombuffer(client.sheet(job_id), np.uint8), cv2.IMREAD_COLOR)
    assert sheet is not None and sheet.ndim == 3


def test_eight_concurrent_jobs_run_on_both_nodes(server, tiny_bundle, astronaut_png, tmp_path):
    client, config = server
    assert client.healthz()["status"] == "ok"
    with ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(lambda seed: client.submit(astronaut_png, "a woman", steps=2, seed=seed, retry_s=120),
                            range(8)))
        statuses = list(pool.map(lambda i: client.wait(i, timeout=240, poll_s=0.2), ids))
    assert len(set(ids)) == 8
    assert [s["status"] for s in statuses] == ["done"] * 8, statuses
    assert all(s["step"] == s["steps"] == 2 and s["error"] is None for s in statuses)
    for job_id in ids:
        _check_outputs(client, job_id, _frames(tiny_bundle), tmp_path)
    nodes = {_record(config, i)["worker"]["node_id"] for i in ids}
    assert nodes == {n["NodeID"] for n in ray.nodes() if n["Alive"]}, "both nodes' replicas took jobs"


def _cli_error(capsys, monkeypatch, folder: Path, bundle: Path, ref: str, *flags: str) -> str:
    """What `stdrc generate` says for the same input, without its `error: ` prefix."""
    monkeypatch.chdir(folder)
    assert main(["generate", "--bundle", str(bundle), "--ref", ref, "--prompt", "a woman", "-o", "out.mp4", "-q",
                 *flags]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: ")
    return line[len("error: "):]


def test_bad_input_is_400_with_the_cli_message(server, tiny_bundle, astronaut_png, blank_png, tmp_path, capsys,
                                               monkeypatch):
    client, _ = server
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "blank.png").write_bytes(blank_png.read_bytes())
    (tmp_path / "face.png").write_bytes(astronaut_png.read_bytes())
    cases = [("notes.txt", {}, ()), ("blank.png", {}, ()), ("face.png", {"steps": 0}, ("--steps", "0")),
             ("face.png", {"ref_scale": float("inf")}, ("--ref-scale", "inf"))]
    for name, options, flags in cases[:3]:
        with pytest.raises(ServerError) as bad:
            client.submit(tmp_path / name, "a woman", **options)
        assert bad.value.status == 400
        assert str(bad.value) == _cli_error(capsys, monkeypatch, tmp_path, tiny_bundle, name, *flags)
    for options, word in (({"seed": "x"}, "seed"), ({"text_scale": "nan"}, "text_scale"), ({"size": "9"}, "size")):
        response = requests.post(client.url + "/v1/generations", data={"prompt": "a", **options},
                                 files={"reference": ("a.png", astronaut_png.read_bytes())}, timeout=30)
        assert response.status_code == 400 and word in response.json()["error"]
    no_file = requests.post(client.url + "/v1/generations", data={"prompt": "a"}, timeout=30)
    assert no_file.status_code == 400 and "reference" in no_file.json()["error"]
    missing = requests.get(client.url + "/v1/generations/nope", timeout=30)
    assert missing.status_code == 404 and "nope" in missing.json()["error"]
    assert requests.get(client.url + "/v1/generations/nope/video", timeout=30).status_code == 404


def _submit_until_refused(client: Client, reference: Path, most: int) -> tuple[list[str], ServerError]:
    ids = []
    for seed in range(most):
        try:
            ids.append(client.submit(reference, "a woman", steps=SLOW_STEPS, seed=seed))
        except ServerError as e:
            return ids, e
    pytest.fail(f"{most} slow jobs in a row were all accepted with max_queue=3 and 2 replicas")


def test_full_queue_is_429_and_results_wait_until_done(server, tiny_bundle, astronaut_png, tmp_path):
    client, config = server
    ids, refused = _submit_until_refused(client, astronaut_png, most=8)
    assert refused.status == 429 and "queue is full" in str(refused)
    assert len(ids) >= config.max_queue  # never refused before max_queue jobs wait
    waiting = [i for i in ids if client.status(i)["status"] == "queued"]
    assert waiting, "a refused submit means jobs were waiting"
    with pytest.raises(ServerError) as early:
        client.video(waiting[-1])
    assert early.value.status == 404 and "queued" in str(early.value)
    for job_id in ids:
        assert client.wait(job_id, timeout=240, poll_s=0.2)["status"] == "done"
    _check_outputs(client, ids[-1], _frames(tiny_bundle), tmp_path)


def test_killed_replica_job_is_retried_and_others_finish(server, tiny_bundle, astronaut_png, tmp_path):
    client, config = server
    ids = [client.submit(astronaut_png, "a woman", steps=SLOW_STEPS, seed=10 + i, retry_s=120) for i in range(4)]
    deadline = time.monotonic() + 120
    victim = None
    while victim is None:
        assert time.monotonic() < deadline, "no job started"
        for job_id in ids:
            record = _record(config, job_id)
            if record["status"] == "running" and record["step"] >= 1:
                victim = record
                break
        time.sleep(0.05)
    os.kill(victim["worker"]["pid"], signal.SIGKILL)
    statuses = {i: client.wait(i, timeout=240, poll_s=0.2) for i in ids}
    hit = statuses[victim["id"]]
    if hit["status"] == "done":
        after = _record(config, victim["id"])
        assert after["attempts"] == 2 and after["worker"]["pid"] != victim["worker"]["pid"]
        _check_outputs(client, victim["id"], _frames(tiny_bundle), tmp_path)
    else:
        assert hit["status"] == "failed" and "replica" in hit["error"], hit
    for job_id in ids:
        if job_id != victim["id"]:
            assert statuses[job_id]["status"] == "done", statuses[job_id]
            _check_outputs(client, job_id, _frames(tiny_bundle), tmp_path)
    assert client.healthz()["status"] == "ok"
