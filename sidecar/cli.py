"""The `kafka-sidecar` command line.

Exit codes: 0 success, 2 usage or config error (nothing was started), anything else is the
daemon's own. The console script passes `main`'s return value to sys.exit.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

import yaml

from sidecar import __version__
from sidecar.config import CONFIG_ENV, ConfigError, SidecarConfig, load_config, redacted

EXIT_USAGE = 2

Command = Callable[[argparse.Namespace], int]


def _load(path: str | None) -> SidecarConfig | None:
    """Load the config, or print why not (each problem on its own line) and return None."""
    try:
        return load_config(path)
    except ConfigError as exc:
        if exc.path is None:
            print(f"kafka-sidecar: {exc}", file=sys.stderr)
        else:
            print(f"kafka-sidecar: invalid config {exc.path}:", file=sys.stderr)
            for problem in exc.problems:
                print(f"  {problem}", file=sys.stderr)
        return None


def _check_config(args: argparse.Namespace) -> int:
    if args.file and args.config:
        print("kafka-sidecar: check-config: give FILE or --config, not both", file=sys.stderr)
        return EXIT_USAGE
    config = _load(args.file or args.config)
    if config is None:
        return EXIT_USAGE
    yaml.safe_dump(redacted(config), sys.stdout, sort_keys=False)
    return 0


def _run(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return EXIT_USAGE
    # Imported here so `check-config` and `--help` never pay for Kafka and gRPC imports.
    from sidecar.daemon import run_daemon

    return run_daemon(config)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kafka-sidecar",
        description="Consume Kafka for an app and stream batches to it over gRPC.",
    )
    parser.add_argument("--version", action="version", version=f"kafka-sidecar {__version__}")
    parser.set_defaults(command=None)
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    config_help = f"the YAML config file (default: ${CONFIG_ENV})"

    check = commands.add_parser(
        "check-config",
        help="validate a config and print it as the sidecar would use it",
        description=(
            "Validate a config file, apply ${VAR} expansion and KAFKA_SIDECAR_* overrides, "
            "and print the effective config as YAML with secrets masked. "
            "Exits 2 if the config is invalid, listing every problem."
        ),
    )
    check.add_argument("file", nargs="?", metavar="FILE", help=config_help)
    check.add_argument("--config", metavar="FILE", help="same as FILE")
    check.set_defaults(command=_check_config)

    run = commands.add_parser(
        "run",
        help="run the sidecar",
        description=(
            "Run the sidecar until SIGTERM or SIGINT: consume the configured subscriptions "
            "and serve them to apps over gRPC. Exits 2 without starting if the config is invalid."
        ),
    )
    run.add_argument("--config", metavar="FILE", help=config_help)
    run.set_defaults(command=_run)

    status = commands.add_parser(
        "status",
        help="show a running sidecar's subscriptions, partitions, offsets and lag",
        description=(
            "Ask a running sidecar (GetStatus) for each subscription's mode, group, assigned "
            "partitions with committed offset, position, high watermark and lag, in-flight "
            "counts, attached streams and caught_up."
        ),
    )
    _add_target_arguments(status, config_help)
    status.add_argument("--subscription", metavar="NAME", help="only this subscription")
    status.add_argument("--json", action="store_true", help="print the raw response as JSON")
    status.set_defaults(command=_status)

    reset = commands.add_parser(
        "reset-offsets",
        help="move a group subscription's committed offsets",
        description=(
            "Live (default): a running sidecar seeks and commits the partitions it owns, drops "
            "what is in flight for them, and reports partitions other members own (untouched). "
            "Offline (--group, sidecar stopped): commits directly for the group; Kafka allows "
            "that only when the group is empty. --dry-run shows the change without making it."
        ),
    )
    _add_target_arguments(reset, config_help)
    where = reset.add_mutually_exclusive_group(required=True)
    where.add_argument("--subscription", metavar="NAME", help="live reset of this subscription")
    where.add_argument(
        "--group", metavar="GROUP", help="offline reset of this consumer group (needs --config)"
    )
    to = reset.add_mutually_exclusive_group(required=True)
    to.add_argument("--to-earliest", action="store_true", help="the first offset still in the log")
    to.add_argument("--to-latest", action="store_true", help="the end: skip everything there is")
    to.add_argument(
        "--to-timestamp",
        metavar="TIME",
        help="the first record at or after TIME (ms since the epoch, or ISO 8601)",
    )
    to.add_argument(
        "--to-offset",
        metavar="TOPIC:PARTITION=OFFSET",
        action="append",
        help="an explicit offset (repeatable)",
    )
    reset.add_argument(
        "--topic", action="append", default=[], help="limit to this topic (repeatable)"
    )
    reset.add_argument("--dry-run", action="store_true", help="show the change, make none")
    reset.set_defaults(command=_reset_offsets)
    return parser


def _add_target_arguments(parser: argparse.ArgumentParser, config_help: str) -> None:
    parser.add_argument(
        "--target",
        metavar="ADDRESS",
        help="the sidecar's gRPC address (default: the first listen.grpc of --config, "
        "else 127.0.0.1:50051)",
    )
    parser.add_argument("--config", metavar="FILE", help=config_help)
    parser.add_argument(
        "--token",
        help="bearer token for the sidecar (default: listen.auth_token of --config, "
        "else $KAFKA_SIDECAR_TOKEN)",
    )


def _status(args: argparse.Namespace) -> int:
    from sidecar import admin

    return admin.status(args)


def _reset_offsets(args: argparse.Namespace) -> int:
    from sidecar import admin

    return admin.reset_offsets(args)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command: Command | None = args.command
    if command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    return command(args)
