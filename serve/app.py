"""Deploying the bundle on a Ray cluster: the registry actor, N `Generator` replicas and the HTTP ingress."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import ray
from ray import serve

from stdrc.runtime.backends import resolve_device
from stdrc.runtime.errors import InputError
from stdrc.runtime.manifest import read_manifest
from stdrc.runtime.vocab import DEVICES, MEMORY_PLANS
from stdrc.serve.api import Api
from stdrc.serve.registry import get_registry, registry_actor
from stdrc.serve.replica import Generator

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeConfig:
    """`stdrc serve`'s options. On CUDA a replica holds one GPU; on CPU `cpus_per_replica` cores."""

    bundle: Path
    replicas: int = 1
    host: str = "127.0.0.1"
    port: int = 8000
    max_queue: int = 16  # jobs waiting for a replica beyond those running; more are refused with 429
    address: str | None = None  # join this Ray cluster ("auto", "HOST:6379"); None starts a local one
    keep_s: float = 3600.0  # finished jobs and their files are kept this long
    device: str = "auto"  # auto: cuda when the bundle's backends can use it on this (the driver's) machine
    memory_plan: str = "all"  # runtime/memory.py: all, staged or auto, per replica
    cpus_per_replica: float = 1.0
    app_name: str = "stdrc"
    object_store_mb: int | None = None  # only when starting a local cluster (Ray's default: 30% of RAM)

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise InputError(f"--replicas {self.replicas}: use 1 or more")
        if self.max_queue < 0:
            raise InputError(f"--max-queue {self.max_queue}: use 0 or more")
        if not 0 < self.port < 65536:
            raise InputError(f"--port {self.port}: use a port in 1-65535")
        if not self.keep_s > 0:
            raise InputError(f"--keep {self.keep_s}: keep finished jobs a positive number of seconds")
        if self.device not in DEVICES:
            raise InputError(f"--device {self.device}: use {', '.join(DEVICES)}")
        if self.memory_plan not in MEMORY_PLANS:
            raise InputError(f"--memory-plan {self.memory_plan}: use one of {', '.join(MEMORY_PLANS)}")
        if not self.cpus_per_replica > 0:
            raise InputError(f"--cpus-per-replica {self.cpus_per_replica}: use a positive number")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def replica_resources(self) -> dict:
        """One GPU per replica on CUDA (Ray sets CUDA_VISIBLE_DEVICES, so it sees cuda:0), else cores."""
        if self.device == "cuda":
            return {"num_gpus": 1, "num_cpus": 1}
        return {"num_cpus": self.cpus_per_replica}


def build(config: ServeConfig) -> serve.Application:
    if config.device == "auto":  # decided once, here: a replica's resources depend on it
        backends = {e.backend for e in read_manifest(config.bundle).components.values()}
        config = replace(config, device=resolve_device("auto", backends))
    generator = serve.deployment(
        Generator, name="Generator", num_replicas=config.replicas, max_ongoing_requests=1,
        ray_actor_options=config.replica_resources(), health_check_period_s=5, health_check_timeout_s=60,
        graceful_shutdown_timeout_s=5,
    )
    ingress = serve.deployment(Api, name="Api", num_replicas=1, max_ongoing_requests=1000,
                               ray_actor_options={"num_cpus": 0})
    bundle, names = str(config.bundle.resolve()), (config.app_name, config.max_queue, config.keep_s)
    return ingress.bind(generator.bind(bundle, *names, config.device, config.memory_plan), bundle, *names)


def app_builder(args: dict) -> serve.Application:
    """For a Serve config file or a KubeRay RayService: `import_path: stdrc.serve.app:app_builder`,
    `args`: ServeConfig's fields (`bundle` required). `host`/`port` are then the config file's."""
    return build(ServeConfig(**{**args, "bundle": Path(args["bundle"])}))


def deploy(config: ServeConfig) -> str:
    """Start (or join, with `address`) a Ray cluster and deploy; returns the API's URL. Blocks until ready."""
    read_manifest(config.bundle)  # a missing or broken bundle fails here, with its message, not in a replica
    if not ray.is_initialized():
        store = None if config.address or not config.object_store_mb else config.object_store_mb * 2**20
        ray.init(address=config.address, namespace="stdrc", logging_level=logging.WARNING,
                 object_store_memory=store)
    registry = registry_actor(config.app_name, config.max_queue, config.keep_s)
    ray.get(registry.configure.remote(config.max_queue, config.keep_s))
    serve.start(proxy_location="HeadOnly", http_options={"host": config.host, "port": config.port})
    serve.run(build(config), name=config.app_name, route_prefix="/")
    log.info("serving %s with %d replica(s) at %s", config.bundle, config.replicas, config.url)
    return config.url


def undeploy(config: ServeConfig) -> None:
    """Remove the app and the registry (and with it every job and result)."""
    try:
        serve.delete(config.app_name)
    except Exception as e:
        log.debug("serve.delete: %s", e)
    try:
        ray.kill(get_registry(config.app_name))
    except ValueError:
        pass
