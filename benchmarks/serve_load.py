"""Jobs per minute through `stdrc serve` with 1 and 2 replicas, side by side in one run (issue 15).

One local Ray node; each replica count is deployed in turn on the same cluster, warmed up (every
replica has loaded the bundle and run a job), then `--jobs` jobs are submitted at once over HTTP
(the client retries a full queue) and the time until the last one is done is measured, `--repeats`
times. Jobs/min = jobs / that time. The scaling ratio is jobs/min at 2 replicas over 1, from the
medians. Everything goes through the real HTTP API, the registry and the replicas.

    python benchmarks/serve_load.py                          # builds the tiny bundle in a temp folder
    python benchmarks/serve_load.py --bundle bundles/tiny --jobs 16 --steps 2 --repeats 3 --json
"""

from __future__ import annotations

import argparse
import logging
import socket
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import harness


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_bundle(folder: Path) -> Path:
    from stdrc.engines.build import BuildConfig, build_engines

    return build_engines(BuildConfig(out=folder / "tiny", cache_dir=folder / "cache", backend="onnxruntime",
                                     progress=False))


def _batch(client, reference: Path, jobs: int, steps: int, seed: int) -> float:
    """Seconds from the first submit to the last job done; every job must be done."""
    start = time.perf_counter()
    with ThreadPoolExecutor(min(jobs, 16)) as pool:
        ids = list(pool.map(lambda i: client.submit(reference, "a woman", steps=steps, seed=seed + i,
                                                    retry_s=600), range(jobs)))
        statuses = list(pool.map(lambda i: client.wait(i, timeout=1200, poll_s=0.1), ids))
    elapsed = time.perf_counter() - start
    failed = [s for s in statuses if s["status"] != "done"]
    if failed:
        raise SystemExit(f"{len(failed)} job(s) failed: {failed[0]['error']}")
    return elapsed


def measure(bundle: Path, reference: Path, replicas: int, args: argparse.Namespace) -> dict:
    from ray import serve

    from stdrc.runtime.client import Client
    from stdrc.serve.app import ServeConfig, deploy, undeploy

    config = ServeConfig(bundle=bundle, replicas=replicas, port=args.port, max_queue=args.jobs, keep_s=600,
                         cpus_per_replica=args.cpus_per_replica)
    client = Client(deploy(config))
    try:
        _batch(client, reference, 2 * replicas, args.steps, seed=10_000)  # warm-up: every replica loaded
        times = [_batch(client, reference, args.jobs, args.steps, seed=r * args.jobs) for r in range(args.repeats)]
    finally:
        undeploy(config)
        serve.delete(config.app_name)
    jpm = [args.jobs / t * 60 for t in times]
    return {"replicas": replicas, "seconds": [round(t, 3) for t in times],
            "jobs_per_min": {"median": round(statistics.median(jpm), 2), "max": round(max(jpm), 2),
                             "all": [round(j, 2) for j in jpm]}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=None, help="default: build the tiny bundle in a temp folder")
    parser.add_argument("--reference", type=Path, default=None, help="default: skimage's astronaut")
    parser.add_argument("--jobs", type=int, default=16, help="jobs per timed batch")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--cpus-per-replica", type=float, default=1.0)
    parser.add_argument("--num-cpus", type=int, default=2, help="the local Ray node's CPUs")
    parser.add_argument("--object-store-mb", type=int, default=256)
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--out", type=Path, default=None,
                        help="also write the JSON report here (Ray may print to stdout)")
    args = parser.parse_args(argv)
    args.port = args.port or _free_port()

    import ray
    from ray import serve

    with tempfile.TemporaryDirectory(prefix="stdrc-serve-bench-") as tmp:
        tmp = Path(tmp)
        bundle = args.bundle or _tiny_bundle(tmp)
        reference = args.reference
        if reference is None:
            import cv2
            import skimage.data

            reference = tmp / "astronaut.png"
            cv2.imwrite(str(reference), cv2.cvtColor(skimage.data.astronaut(), cv2.COLOR_RGB2BGR))
        ray.init(num_cpus=args.num_cpus, object_store_memory=args.object_store_mb * 2**20, namespace="stdrc",
                 logging_level=logging.WARNING, log_to_driver=False)
        try:
            rows = [measure(bundle, reference, n, args) for n in args.replicas]
        finally:
            serve.shutdown()
            ray.shutdown()
    by_n = {r["replicas"]: r["jobs_per_min"]["median"] for r in rows}
    ratio = by_n[2] / by_n[1] if 1 in by_n and 2 in by_n else None
    report = {"benchmark": "serve_load", "timestamp": harness.timestamp(), "device": harness.device_info("cpu"),
              "load_average": harness.load_average(),
              "versions": {**harness.versions(), "ray": harness._version("ray")},
              "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "out"},
              "rows": rows, "scaling_ratio_2_over_1": None if ratio is None else round(ratio, 3)}
    if args.out is not None:
        args.out.write_text(harness.dump_json(report))
    if args.json:
        print(harness.dump_json(report))
    else:
        print(f"{'replicas':>8}  {'jobs/min (median)':>17}  {'max':>7}  seconds per batch of {args.jobs}")
        for r in rows:
            print(f"{r['replicas']:>8}  {r['jobs_per_min']['median']:>17.1f}  {r['jobs_per_min']['max']:>7.1f}  "
                  f"{r['seconds']}")
        print(f"scaling 2/1: {harness.fmt(ratio, '.2f')}  (load average {report['load_average']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
