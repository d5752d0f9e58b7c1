"""`stdrc app`: a local Gradio page for generation. Gradio is imported only when the page starts.

The parser hook lives here so that `stdrc --help` lists the subcommand without the `app` extra.
"""

from __future__ import annotations

import argparse

from stdrc.runtime.cli import FORMATTER, add_device_flag
from stdrc.runtime.vocab import MEMORY_PLANS


def add_app_parser(sub: argparse._SubParsersAction) -> None:
    a = sub.add_parser("app", help="a local web page: reference photo + prompt -> video (needs stdrc[app])",
                       formatter_class=FORMATTER,
                       description="A local web page (Gradio) over one in-process Pipeline, or over a `stdrc serve` "
                                   "endpoint with --server: photo, prompt, Generate with progress and Cancel.")
    a.add_argument("--bundle", required=True, help="engine bundle folder (stdrc-export build-engines)")
    a.add_argument("--port", type=int, default=7860, help="HTTP port")
    a.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 exposes it on the network)")
    a.add_argument("--server", default=None, metavar="URL",
                   help="submit to a `stdrc serve` endpoint instead of running the bundle in this process")
    add_device_flag(a, "in-process device (auto: CUDA when the bundle's backend can use it here)")
    a.add_argument("--memory-plan", default="all", choices=MEMORY_PLANS,
                   help="in process: all engines resident, or each loaded for its stage (see stdrc plan)")
    a.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from stdrc.app.page import AppConfig, serve

    serve(AppConfig(bundle=args.bundle, host=args.host, port=args.port, server=args.server, device=args.device,
                    memory_plan=args.memory_plan))
    return 0
