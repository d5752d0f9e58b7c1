"""A small client for `stdrc serve`'s job API (`stdrc submit`, the app's --server mode, scripts).

It lives in the runtime, not in `stdrc.serve`, so that the app reaches a server without importing
the serving side; it needs `requests` (the `serve` and `app` extras), not Ray.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import requests

from stdrc.runtime.errors import StdrcError
from stdrc.runtime.options import FORM_FIELDS

TERMINAL = ("done", "failed")


class ServerError(StdrcError):
    """The server refused a request or cannot be reached; the message is the server's `error`."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Client:
    url: str = "http://127.0.0.1:8000"
    timeout: float = 60.0  # per HTTP call

    def _call(self, method: str, path: str, **kwargs) -> requests.Response:
        try:
            response = requests.request(method, self.url.rstrip("/") + path, timeout=self.timeout, **kwargs)
        except requests.RequestException as e:
            raise ServerError(f"cannot reach {self.url} ({type(e).__name__}): is `stdrc serve` running there?") from e
        if response.status_code >= 400:
            try:
                message = response.json()["error"]
            except (ValueError, KeyError, TypeError):
                message = f"HTTP {response.status_code} from {self.url}{path}"
            raise ServerError(message, response.status_code)
        return response

    def submit(self, reference: str | Path | bytes, prompt: str, retry_s: float = 0.0, **options) -> str:
        """POST a job; returns its id. Options: the job API's form fields (GenerationOptions' served
        fields: negative_prompt, seed, steps, ...); the server checks their values.

        `retry_s`: keep retrying a full queue (429) this long before giving up.
        """
        unknown = sorted(set(options) - set(FORM_FIELDS))
        if unknown:
            raise ServerError(f"unknown option(s) {', '.join(unknown)}: the job API takes {', '.join(FORM_FIELDS)}")
        data = reference if isinstance(reference, bytes) else Path(reference).read_bytes()
        name = "reference.png" if isinstance(reference, bytes) else Path(reference).name
        fields = {"prompt": prompt, **{k: str(v).lower() if isinstance(v, bool) else str(v)
                                       for k, v in options.items() if v is not None}}
        deadline = time.monotonic() + retry_s
        while True:
            try:
                files = {"reference": (name, data)}
                return self._call("POST", "/v1/generations", data=fields, files=files).json()["id"]
            except ServerError as e:
                if e.status != 429 or time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def status(self, job_id: str) -> dict:
        return self._call("GET", f"/v1/generations/{job_id}").json()

    def wait(self, job_id: str, timeout: float = 3600.0, poll_s: float = 0.5) -> dict:
        """Polls until done or failed; returns the last status."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.status(job_id)
            if status["status"] in TERMINAL:
                return status
            if time.monotonic() > deadline:
                raise ServerError(f"job {job_id} still {status['status']} after {timeout:.0f} s")
            time.sleep(poll_s)

    def video(self, job_id: str) -> bytes:
        return self._call("GET", f"/v1/generations/{job_id}/video").content

    def sheet(self, job_id: str) -> bytes:
        return self._call("GET", f"/v1/generations/{job_id}/sheet").content

    def healthz(self) -> dict:
        return self._call("GET", "/healthz").json()
