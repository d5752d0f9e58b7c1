"""stdrc: make a video of the person in a reference photo, doing what a prompt says.

Runs an engine bundle built by `stdrc-export build-engines` (ONNX Runtime, torch, AOTInductor or
TensorRT engines), and measures FaceSim between a video and a photo.
"""

from __future__ import annotations

import argparse
import logging
import sys

from stdrc import __version__
from stdrc.app import add_app_parser
from stdrc.runtime import cli as runtime_cli
from stdrc.serve.cli import add_serve_parsers


def build_parser() -> argparse.ArgumentParser:
    """Every subcommand is listed whatever is installed; a missing extra is reported when one runs."""
    parser = argparse.ArgumentParser(prog="stdrc", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    runtime_cli.add_parsers(sub)
    add_serve_parsers(sub)
    add_app_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "quiet", False):
        logging.getLogger("stdrc.runtime.backends").setLevel(logging.INFO)  # the device auto line
    return runtime_cli.run_command(args)


if __name__ == "__main__":
    sys.exit(main())
