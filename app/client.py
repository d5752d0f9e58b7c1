"""A thin client for a `stdrc serve` endpoint (its versioned job API), as a backend of the page.

POST {url}/v1/generations (multipart: reference file + fields) -> 202 {"id"}; GET
/v1/generations/{id} -> {"status": queued|running|done|failed, "step", "steps", "error",
"facesim"}; GET .../video and .../sheet once done. The API has no cancel: Cancel stops
waiting here while the server's job runs on.
"""

from __future__ import annotations

import mimetypes
import threading
import time
import uuid
from pathlib import Path

from stdrc.app.backends import Cancelled, Job, OnStep, Outcome
from stdrc.runtime.errors import InputError, StdrcError


class ServerError(StdrcError):
    """The `stdrc serve` endpoint cannot be reached or answered with an error."""


class ServerClient:
    face_crop_optional = False  # the serve API always crops the face

    def __init__(self, url: str, out_dir: Path, poll_s: float = 0.5, timeout_s: float = 30.0):
        import httpx

        self.url = url.rstrip("/")
        self.out_dir = out_dir
        self.poll_s = poll_s
        self._http = httpx.Client(base_url=self.url, timeout=timeout_s)

    def _request(self, method: str, path: str, **kwargs):  # noqa: ANN003, ANN202
        import httpx

        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as e:
            raise ServerError(f"server {self.url} unreachable ({e}): start `stdrc serve` there or fix --server") from e
        if response.status_code >= 400:
            try:
                detail = response.json()
                detail = detail.get("error") or detail.get("detail") or detail
            except ValueError:
                detail = response.text.strip()[:200]
            kind = InputError if response.status_code in (400, 413, 415, 422) else ServerError
            raise kind(f"server: {detail}" if kind is InputError else
                       f"server {self.url} answered {response.status_code} to {method} {path}: {detail}")
        return response

    def submit(self, job: Job) -> str:
        fields = {"prompt": job.prompt, "negative_prompt": job.negative_prompt, "seed": str(job.seed)}
        for name in ("steps", "text_scale", "ref_scale"):
            if getattr(job, name) is not None:
                fields[name] = str(getattr(job, name))
        path = Path(job.reference)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise InputError(f"cannot read the reference photo {path}: {e.strerror}") from e
        mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        answer = self._request("POST", "/v1/generations", data=fields, files={"reference": (path.name, data, mime)})
        return str(answer.json()["id"])

    def wait(self, job_id: str, on_step: OnStep, cancel: threading.Event) -> dict:
        """Poll the job until it is done; report each new step; raise its error if it failed."""
        seen = -1
        while True:
            if cancel.is_set():
                raise Cancelled(f"stopped waiting after {max(seen, 0)} steps")
            state = self._request("GET", f"/v1/generations/{job_id}").json()
            step, steps = state.get("step"), state.get("steps")
            if step is not None and steps and step != seen:
                seen = step
                on_step(int(step), int(steps))
            if state["status"] == "done":
                return state
            if state["status"] == "failed":
                raise StdrcError(state.get("error") or f"server job {job_id} failed without a message")
            time.sleep(self.poll_s)

    def generate(self, job: Job, on_step: OnStep, cancel: threading.Event) -> Outcome:
        job_id = self.submit(job)
        try:
            state = self.wait(job_id, on_step, cancel)
        except Cancelled as e:
            raise Cancelled(f"{e} (the server's job {job_id} runs on: its API has no cancel)") from e
        stem = self.out_dir / uuid.uuid4().hex[:12]
        video, sheet = stem.with_suffix(".mp4"), stem.with_name(stem.name + "_sheet.png")
        video.write_bytes(self._request("GET", f"/v1/generations/{job_id}/video").content)
        sheet.write_bytes(self._request("GET", f"/v1/generations/{job_id}/sheet").content)
        facesim = state.get("facesim")
        return Outcome(str(video), str(sheet), None if facesim is None else float(facesim), scored=True)
