"""The HTTP ingress (FastAPI under Ray Serve): the versioned job API of docs/serving.md.

It holds no model. It checks a request with the Pipeline's own validation (no engine loaded),
records the job in the registry and hands its id to the `Generator` replicas through a Serve
handle (Serve queues and routes; one job in flight per replica). A replica that dies mid-job
raises here: the job is dispatched once more, then marked failed with the reason.
"""

# no `from __future__ import annotations`: FastAPI reads these signatures through Serve's rewrite

import asyncio
import logging
import threading

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import ReplicaUnavailableError

from stdrc.runtime.errors import StdrcError
from stdrc.runtime.options import GenerationOptions
from stdrc.serve import request as rq
from stdrc.serve.registry import DONE, registry_actor

log = logging.getLogger(__name__)
MAX_UPLOAD = 20 * 1024 * 1024
REPLICA_DIED = (RayActorError, ActorUnavailableError, ReplicaUnavailableError)
MEDIA = {"video": "video/mp4", "sheet": "image/png"}

app = FastAPI(title="stdrc", version="1", description="identity-preserving text-to-video jobs")


def _error(status: int, message: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers or None)


@serve.ingress(app)  # at import, so that every process importing this module gets the same routes
class Api:
    def __init__(self, generator, bundle: str, app_name: str, max_queue: int, keep_s: float):
        self.generator = generator  # a Serve DeploymentHandle to the Generator replicas
        self.registry = registry_actor(app_name, max_queue, keep_s)
        self.checker = rq.Checker(bundle)
        self.check_lock = threading.Lock()  # the face detector is not thread-safe
        self.tasks: set[asyncio.Task] = set()
        self.resumed = False

    async def _resume(self) -> None:
        """After an ingress restart, dispatch the jobs that were still waiting (their calls died with it)."""
        if not self.resumed:
            self.resumed = True
            for job_id in await self.registry.unfinished.remote():
                self._dispatch(job_id)

    def _dispatch(self, job_id: str) -> None:
        task = asyncio.get_running_loop().create_task(self._run(job_id))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _run(self, job_id: str) -> None:
        for attempt in (1, 2):
            try:
                await self.generator.generate.remote(job_id)
                return
            except REPLICA_DIED as e:
                reason = f"the replica running it died ({type(e).__name__})"
                log.warning("job %s: %s, attempt %d", job_id, reason, attempt)
                if attempt == 1:
                    await self.registry.requeue.remote(job_id, f"{reason}; retrying on another replica")
                else:
                    await self.registry.fail.remote(job_id, f"{reason}, twice: giving up")
            except Exception as e:
                log.exception("job %s failed", job_id)
                first = str(e).strip().splitlines()
                await self.registry.fail.remote(job_id, f"internal error {type(e).__name__}: "
                                                        f"{first[-1] if first else ''}")
                return

    def _check(self, request: GenerationOptions, reference: bytes, name: str) -> None:
        with self.check_lock:
            self.checker.check(request, reference, name)

    @app.post("/v1/generations", status_code=202)
    async def submit(self, http: Request) -> JSONResponse:
        await self._resume()
        form = await http.form()
        upload = form.get("reference")
        if upload is None or isinstance(upload, str):
            return _error(400, "no reference image: send it as the multipart file field 'reference'")
        reference = await upload.read(MAX_UPLOAD + 1)
        if len(reference) > MAX_UPLOAD:
            return _error(400, f"reference image is over {MAX_UPLOAD // 2**20} MB: send a smaller PNG or JPEG")
        name = rq.safe_name(upload.filename)
        try:
            request = rq.parse_form({k: v for k, v in form.items() if isinstance(v, str)})
            await asyncio.to_thread(self._check, request, reference, name)
        except StdrcError as e:
            return _error(400, str(e))
        job_id = await self.registry.create.remote(request.to_json(), reference, name)
        if job_id is None:
            return _error(429, "the queue is full: retry later, or add replicas", **{"Retry-After": "5"})
        self._dispatch(job_id)
        return JSONResponse({"id": job_id}, status_code=202)

    @app.get("/v1/generations/{job_id}")
    async def status(self, job_id: str) -> JSONResponse:
        status = await self.registry.status.remote(job_id)
        if status is None:
            return _error(404, f"no job {job_id}: it never existed or finished too long ago")
        return JSONResponse(status)

    async def _file(self, job_id: str, kind: str) -> Response:
        status = await self.registry.status.remote(job_id)
        if status is None:
            return _error(404, f"no job {job_id}: it never existed or finished too long ago")
        if status["status"] != DONE:
            return _error(404, f"job {job_id} is {status['status']}: its {kind} exists once it is done")
        data = await self.registry.result.remote(job_id, kind)
        if data is None:
            return _error(404, f"the {kind} of job {job_id} was removed")
        return Response(data, media_type=MEDIA[kind])

    @app.get("/v1/generations/{job_id}/video")
    async def video(self, job_id: str) -> Response:
        return await self._file(job_id, "video")

    @app.get("/v1/generations/{job_id}/sheet")
    async def sheet(self, job_id: str) -> Response:
        return await self._file(job_id, "sheet")

    @app.get("/healthz")
    async def healthz(self) -> JSONResponse:
        await self._resume()
        return JSONResponse({"status": "ok", "jobs": await self.registry.counts.remote()})
