"""`stdrc serve`: the bundle behind a versioned HTTP job API on Ray Serve (docs/serving.md).

Importing this package needs no Ray: the CLI hook below adds the subcommands, which import
Ray only when run.
"""

from __future__ import annotations

import argparse


def add_serve_parsers(subparsers: argparse._SubParsersAction) -> None:
    from stdrc.serve.cli import add_serve_parsers as add

    add(subparsers)
