"""`--server URL`: the page's backend over `stdrc serve`'s job API, through `stdrc.runtime.client.Client`.

This adds what the page needs on top of that client: progress per step while polling, Cancel
(the API has none: Cancel stops waiting here while the server's job runs on), and the results
written as files for the page's video and image components.
"""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

from stdrc.app.backends import Cancelled, Job, OnStep, Outcome
from stdrc.runtime.errors import StdrcError


class ServerBackend:
    def __init__(self, url: str, out_dir: Path, poll_s: float = 0.5):
        from stdrc.runtime.client import Client  # requests, no Ray

        self.client = Client(url)
        self.out_dir = out_dir
        self.poll_s = poll_s

    def wait(self, job_id: str, on_step: OnStep, cancel: threading.Event) -> dict:
        """Poll until done; report each new step; a failed job raises its error (the Pipeline's message)."""
        seen = None
        while True:
            if cancel.is_set():
                raise Cancelled(f"stopped waiting after {seen or 0} steps (the server's job {job_id} runs on: "
                                "its API has no cancel)")
            state = self.client.status(job_id)
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
        form = job.options.form()  # the job API's fields
        job_id = self.client.submit(job.reference, form.pop("prompt"), **form)
        state = self.wait(job_id, on_step, cancel)
        stem = self.out_dir / uuid.uuid4().hex[:12]
        video, sheet = stem.with_suffix(".mp4"), stem.with_name(stem.name + "_sheet.png")
        video.write_bytes(self.client.video(job_id))
        sheet.write_bytes(self.client.sheet(job_id))
        facesim = state.get("facesim")
        return Outcome(str(video), str(sheet), None if facesim is None else float(facesim),
                       scored=bool(state.get("facesim_scored")))  # the server's Pipeline decided
