"""The `Generator` deployment: one replica, one `Pipeline` (loaded once), one job at a time."""

from __future__ import annotations

import logging
import os
import time

import ray

from stdrc.runtime.errors import StdrcError
from stdrc.runtime.options import GenerationOptions
from stdrc.runtime.pipeline import Pipeline
from stdrc.serve import request as rq
from stdrc.serve.registry import registry_actor

log = logging.getLogger(__name__)


class Generator:
    """Takes job ids from the ingress (Ray Serve routes them, one in flight per replica), runs them,
    and leaves status, progress and result bytes in the registry."""

    def __init__(self, bundle: str, app_name: str, max_queue: int, keep_s: float, device: str = "auto",
                 memory_plan: str = "all"):
        self.pipe = Pipeline.from_bundle(bundle, device=device, memory_plan=memory_plan)
        self.pipe.engines.warm()  # loaded before the first job
        self.registry = registry_actor(app_name, max_queue, keep_s)  # the existing one, or a new one
        self.worker = {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
                       "replica": _replica_id()}
        log.info("replica %s loaded %s on %s", self.worker["replica"], bundle, device)

    def generate(self, job_id: str) -> str:
        """Runs one job to done or failed (bad input fails it, no retry) and returns its status.

        A replica that dies here raises in the ingress instead, which retries the job once.
        """
        job = ray.get(self.registry.start.remote(job_id, self.worker))
        if job is None:
            return "gone"
        request = GenerationOptions.from_json(job.request)

        last = [0.0]

        def on_step(i: int, total: int) -> None:  # fire and forget, a few times a second at most
            now = time.monotonic()
            if now - last[0] > 0.2 or i + 1 == total:
                last[0] = now
                self.registry.progress.remote(job_id, i + 1, total)

        try:
            out = rq.run(self.pipe, request, job.reference, job.reference_name, on_step=on_step)
        except StdrcError as e:
            ray.get(self.registry.fail.remote(job_id, str(e)))
            return "failed"
        ray.get(self.registry.finish.remote(job_id, out.video, out.sheet, out.facesim,
                                                 out.facesim_scored))
        return "done"

    def check_health(self) -> None:
        """Serve's health probe: the registry must answer, or no job can be recorded."""
        ray.get(self.registry.counts.remote(), timeout=30)


def _replica_id() -> str:
    from ray import serve

    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:
        return "local"
