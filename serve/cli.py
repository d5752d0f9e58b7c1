"""`stdrc serve` and `stdrc submit`: parse, then call stdrc.serve.app / stdrc.runtime.client."""

from __future__ import annotations

import argparse
import json
import signal
import time
from pathlib import Path

from stdrc.runtime.cli import FORMATTER, add_device_flag, add_generation_flags, options_from_args
from stdrc.runtime.errors import StdrcError, require_extra
from stdrc.runtime.vocab import MEMORY_PLANS


def _serve(args: argparse.Namespace) -> int:
    require_extra("ray.serve", "serve", "`stdrc serve`")
    import ray
    from ray import serve

    from stdrc.serve.app import ServeConfig, deploy, undeploy

    config = ServeConfig(bundle=Path(args.bundle), replicas=args.replicas, host=args.host, port=args.port,
                         max_queue=args.max_queue, address=args.address, keep_s=args.keep, device=args.device,
                         memory_plan=args.memory_plan, cpus_per_replica=args.cpus_per_replica,
                         object_store_mb=args.object_store_mb)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops it as cleanly as Ctrl+C
    try:
        url = deploy(config)
        print(f"serving {args.bundle} at {url} ({args.replicas} replica(s)); Ctrl+C stops", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl+C must not cut the cleanup short
        if ray.is_initialized():
            undeploy(config)
            serve.shutdown()
            ray.shutdown()
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _submit(args: argparse.Namespace) -> int:
    require_extra("requests", "serve", "`stdrc submit`")
    from stdrc.runtime.client import Client
    from stdrc.runtime.video import check_writable

    form = options_from_args(args, served_only=True).form()  # checked here first, with the CLI's messages
    output = check_writable(args.output)
    client = Client(args.server)
    job_id = client.submit(args.ref, form.pop("prompt"), retry_s=args.retry, **form)
    status = client.wait(job_id, timeout=args.timeout)
    if status["status"] == "failed":
        raise StdrcError(f"job {job_id} failed: {status['error']}")
    output.write_bytes(client.video(job_id))
    sheet = output.with_name(output.stem + "_sheet.png")
    sheet.write_bytes(client.sheet(job_id))
    summary = {"id": job_id, "video": str(output), "contact_sheet": str(sheet), "facesim": status["facesim"]}
    print(json.dumps(summary) if args.json else f"wrote {output} and {sheet} (job {job_id})")
    return 0


def add_serve_parsers(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("serve", help="serve a bundle over HTTP on a Ray cluster (Ray Serve)", formatter_class=FORMATTER,
                       description="Deploy the bundle on Ray Serve behind a versioned HTTP job API (docs/serving.md): "
                                   "one replica holds one Pipeline (one GPU on CUDA); jobs survive a replica's death.")
    s.add_argument("--bundle", required=True, help="engine bundle folder, at the same path on every node")
    s.add_argument("--replicas", type=int, default=1, help="Generator replicas (one Pipeline, one GPU each)")
    s.add_argument("--host", default="127.0.0.1", help="HTTP bind address (0.0.0.0 only behind a firewall)")
    s.add_argument("--port", type=int, default=8000, help="HTTP port")
    s.add_argument("--max-queue", type=int, default=16, help="waiting jobs beyond which POST answers 429")
    s.add_argument("--address", default=None, help="join this Ray cluster (auto, HOST:6379); default: start one")
    s.add_argument("--keep", type=float, default=3600.0, help="seconds finished jobs and their files are kept")
    add_device_flag(s, "cuda: one GPU per replica; auto: cuda when the bundle's backend can use it here")
    s.add_argument("--memory-plan", default="all", choices=MEMORY_PLANS,
                   help="per replica: all engines resident, or each loaded for its stage (see stdrc plan)")
    s.add_argument("--cpus-per-replica", type=float, default=1.0, help="CPU cores a replica reserves")
    s.add_argument("--object-store-mb", type=int, default=None,
                   help="object store size of a cluster started here (default: Ray's)")
    s.set_defaults(func=_serve)

    t = sub.add_parser("submit", help="send one job to `stdrc serve` and download its video", formatter_class=FORMATTER,
                       description="Submit one generation to a running `stdrc serve`, wait for it, and download the "
                                   "video and contact sheet.")
    t.add_argument("--server", default="http://127.0.0.1:8000", help="the serve endpoint")
    t.add_argument("--ref", required=True, help="reference photo (PNG/JPEG)")
    add_generation_flags(t, served_only=True)  # the job API's form fields
    t.add_argument("-o", "--output", required=True, help="output .mp4 (a _sheet.png goes beside it)")
    t.add_argument("--retry", type=float, default=60.0, help="seconds to keep retrying a full queue (429)")
    t.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the job")
    t.add_argument("--json", action="store_true", help="print one JSON object")
    t.set_defaults(func=_submit)
