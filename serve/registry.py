"""The job registry: one detached Ray actor on the head node holding every job's status and result bytes.

Results live here, in this actor's memory (not on any disk), so the ingress answers for them from any
node; a finished job and its bytes are dropped `keep_s` seconds after it finished, or when the cluster
stops. Dispatch and queueing are Ray Serve's (the ingress calls the replicas through a handle); this
actor only counts queued jobs to refuse new ones past `max_queue`.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import asdict, dataclass, field, replace

QUEUED, RUNNING, DONE, FAILED = "queued", "running", "done", "failed"
NAMESPACE = "stdrc"


@dataclass(frozen=True)
class Job:
    id: str
    request: dict  # GenerationOptions.to_json()
    reference: bytes
    reference_name: str
    status: str = QUEUED
    step: int = 0
    steps: int | None = None
    error: str | None = None
    facesim: float | None = None
    facesim_scored: bool = False  # FaceSim was measured (the Pipeline's decision); None above then: no face
    attempts: int = 0  # replicas that started it
    worker: dict = field(default_factory=dict)  # node_id, pid, replica of the latest attempt
    created: float = 0.0
    finished: float | None = None

    def public(self) -> dict:
        """What `GET /v1/generations/{id}` answers."""
        return {"id": self.id, "status": self.status, "step": self.step, "steps": self.steps,
                "error": self.error, "facesim": self.facesim, "facesim_scored": self.facesim_scored}


class JobRegistry:
    """Plain class; `registry_actor` makes it a named, detached actor pinned to the head node."""

    def __init__(self, max_queue: int, keep_s: float):
        self.max_queue = max_queue
        self.keep_s = keep_s
        self.jobs: dict[str, Job] = {}
        self.results: dict[str, dict[str, bytes]] = {}

    def configure(self, max_queue: int, keep_s: float) -> None:
        self.max_queue, self.keep_s = max_queue, keep_s

    def _sweep(self) -> None:
        now = time.time()
        old = [k for k, j in self.jobs.items() if j.finished is not None and now - j.finished > self.keep_s]
        for k in old:
            del self.jobs[k]
            self.results.pop(k, None)

    def create(self, request: dict, reference: bytes, reference_name: str) -> str | None:
        """A new queued job's id, or None when `max_queue` jobs already wait (the ingress answers 429)."""
        self._sweep()
        if sum(j.status == QUEUED for j in self.jobs.values()) >= self.max_queue:
            return None
        job = Job(uuid.uuid4().hex, request, reference, reference_name, steps=request.get("steps"),
                  created=time.time())
        self.jobs[job.id] = job
        return job.id

    def start(self, job_id: str, worker: dict) -> Job | None:
        """A replica takes the job: running, attempt counted. None when it is unknown or already finished."""
        job = self.jobs.get(job_id)
        if job is None or job.status in (DONE, FAILED):
            return None
        self.jobs[job_id] = job = replace(job, status=RUNNING, step=0, attempts=job.attempts + 1, worker=worker)
        return job

    def progress(self, job_id: str, step: int, steps: int) -> None:
        job = self.jobs.get(job_id)
        if job is not None and job.status == RUNNING:
            self.jobs[job_id] = replace(job, step=step, steps=steps)

    def requeue(self, job_id: str, reason: str) -> None:
        """The replica running it died: back to queued, for the ingress to dispatch once more."""
        job = self.jobs.get(job_id)
        if job is not None and job.status not in (DONE, FAILED):
            self.jobs[job_id] = replace(job, status=QUEUED, step=0, error=reason)

    def finish(self, job_id: str, video: bytes, sheet: bytes, facesim: float | None, scored: bool = False) -> None:
        job = self.jobs.get(job_id)
        if job is None:
            return
        self.results[job_id] = {"video": video, "sheet": sheet}
        self.jobs[job_id] = replace(job, status=DONE, step=job.steps or job.step, error=None, facesim=facesim,
                                    facesim_scored=scored, finished=time.time(), reference=b"")

    def fail(self, job_id: str, error: str) -> None:
        job = self.jobs.get(job_id)
        if job is not None and job.status not in (DONE, FAILED):
            self.jobs[job_id] = replace(job, status=FAILED, error=error, finished=time.time(), reference=b"")

    def status(self, job_id: str) -> dict | None:
        self._sweep()
        job = self.jobs.get(job_id)
        return None if job is None else job.public()

    def record(self, job_id: str) -> dict | None:
        """Everything about a job but its bytes (for operators and tests: which worker ran it)."""
        job = self.jobs.get(job_id)
        return None if job is None else {k: v for k, v in asdict(job).items() if k != "reference"}

    def result(self, job_id: str, kind: str) -> bytes | None:
        self._sweep()
        return self.results.get(job_id, {}).get(kind)

    def unfinished(self, status: str = QUEUED) -> list[str]:
        return [k for k, j in self.jobs.items() if j.status == status]

    def counts(self) -> dict[str, int]:
        out = {s: 0 for s in (QUEUED, RUNNING, DONE, FAILED)}
        for j in self.jobs.values():
            out[j.status] += 1
        return out


def registry_name(app_name: str) -> str:
    return f"{app_name}-jobs"


def registry_actor(app_name: str, max_queue: int, keep_s: float):
    """Create (or get) the detached registry actor, on the head node so it lives as long as the cluster."""
    import ray

    cls = ray.remote(JobRegistry)
    return cls.options(name=registry_name(app_name), namespace=NAMESPACE, lifetime="detached",
                       get_if_exists=True, num_cpus=0, resources={"node:__internal_head__": 0.001},
                       max_concurrency=1).remote(max_queue, keep_s)


def get_registry(app_name: str):
    import ray

    return ray.get_actor(registry_name(app_name), namespace=NAMESPACE)
