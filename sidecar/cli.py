"""The `kafka-sidecar` command line."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from sidecar import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kafka-sidecar",
        description="Consume Kafka for an app and stream batches to it over gRPC.",
    )
    parser.add_argument("--version", action="version", version=f"kafka-sidecar {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    build_parser().parse_args(argv)
    print(f"kafka-sidecar {__version__}")
    return 0
