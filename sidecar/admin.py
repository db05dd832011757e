"""Operator commands: `kafka-sidecar status` and `reset-offsets`.

They talk to a running sidecar over its own gRPC API (so they see what it sees and act
through it), except the offline reset, which talks to Kafka directly for a stopped group.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from datetime import datetime
from typing import TextIO

import grpc
from google.protobuf.json_format import MessageToDict

from kafkasidecar.v1 import consumer_pb2 as pb
from kafkasidecar.v1 import consumer_pb2_grpc as pb_grpc
from sidecar.config import ConfigError, SidecarConfig, load_config

DEFAULT_TARGET = "127.0.0.1:50051"
TOKEN_ENV = "KAFKA_SIDECAR_TOKEN"


def _fail(message: str) -> int:
    print(f"kafka-sidecar: {message}", file=sys.stderr)
    return 1


def _config(args: argparse.Namespace) -> SidecarConfig | None:
    return load_config(args.config) if args.config else None


def _target(args: argparse.Namespace, config: SidecarConfig | None) -> tuple[str, str | None]:
    target = args.target or (config.listen.grpc[0] if config else DEFAULT_TARGET)
    token = args.token
    if token is None and config is not None and config.listen.auth_token is not None:
        token = config.listen.auth_token.get_secret_value()
    return target, token or os.environ.get(TOKEN_ENV)


async def _call(target: str, token: str | None, method: str, request: object) -> object:
    metadata = [("authorization", f"Bearer {token}")] if token else None
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.ConsumerServiceStub(channel)
        return await getattr(stub, method)(request, metadata=metadata, timeout=60)


def _rpc(args: argparse.Namespace, method: str, request: object) -> object | int:
    try:
        config = _config(args)
    except ConfigError as exc:
        return _fail(f"invalid config: {exc}")
    target, token = _target(args, config)
    try:
        return asyncio.run(_call(target, token, method, request))
    except grpc.aio.AioRpcError as exc:
        return _fail(f"{target}: {exc.code().name}: {exc.details()}")


def status(args: argparse.Namespace) -> int:
    response = _rpc(args, "GetStatus", pb.GetStatusRequest(subscription=args.subscription or ""))
    if isinstance(response, int):
        return response
    assert isinstance(response, pb.GetStatusResponse)
    if args.json:
        print(json.dumps(_as_dict(response), indent=2))
    else:
        print_status(response, sys.stdout)
    return 0


def _as_dict(message: pb.GetStatusResponse) -> dict[str, object]:
    # Zeros and empty lists included: partition 0 and lag 0 are facts, not absences.
    return MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def print_status(response: pb.GetStatusResponse, out: TextIO) -> None:
    print(f"kafka-sidecar {response.version}", file=out)
    for sub in response.subscriptions:
        mode = pb.SubscriptionMode.Name(sub.mode).removeprefix("SUBSCRIPTION_MODE_").lower()
        head = f"\n{sub.name} ({mode}"
        head += f", group {sub.group_id})" if sub.group_id else ")"
        head += f": {sub.state}; {'serving' if sub.serving else 'NOT SERVING'}"
        if sub.mode == pb.SUBSCRIPTION_MODE_SNAPSHOT:
            head += f"; caught up: {'yes' if sub.caught_up else 'no'}"
        print(head, file=out)
        print(
            f"  streams {sub.streams}; in flight {sub.in_flight_batches} batches, "
            f"{sub.in_flight_records} records, {sub.in_flight_bytes} bytes",
            file=out,
        )
        if not sub.partitions:
            continue
        rows = [
            ("TOPIC", "PARTITION", "COMMITTED", "POSITION", "HIGH WATERMARK", "LAG", "IN FLIGHT")
        ]
        rows += [
            (
                p.topic,
                str(p.partition),
                str(p.committed_offset) if p.committed_offset >= 0 else "-",
                str(p.position),
                str(p.high_watermark),
                str(p.lag),
                str(p.in_flight_records),
            )
            for p in sub.partitions
        ]
        _table(rows, out)
        for p in sub.partitions:
            if p.stalled:
                print(f"  STALLED {p.topic}[{p.partition}]: {p.stalled}", file=out)


def _table(rows: Sequence[tuple[str, ...]], out: TextIO) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  " + "  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)), file=out
        )


def _reset_request(args: argparse.Namespace) -> pb.ResetOffsetsRequest:
    request = pb.ResetOffsetsRequest(
        subscription=args.subscription or "", topics=args.topic, dry_run=args.dry_run
    )
    if args.to_earliest:
        request.target = pb.RESET_TARGET_EARLIEST
    elif args.to_latest:
        request.target = pb.RESET_TARGET_LATEST
    elif args.to_timestamp is not None:
        request.target = pb.RESET_TARGET_TIMESTAMP
        request.timestamp_ms = _timestamp_ms(args.to_timestamp)
    else:
        request.target = pb.RESET_TARGET_OFFSETS
        for spec in args.to_offset:
            where, _, offset = spec.rpartition("=")
            topic, _, partition = where.rpartition(":")
            if not (topic and partition.isdigit() and offset.isdigit()):
                raise ValueError(f"--to-offset {spec!r}: expected TOPIC:PARTITION=OFFSET")
            request.offsets.add(topic=topic, partition=int(partition), offset=int(offset))
    return request


def _timestamp_ms(text: str) -> int:
    if text.isdigit():
        return int(text)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"--to-timestamp {text!r}: expected ms since the epoch or ISO 8601"
        ) from None
    if moment.tzinfo is None:
        raise ValueError(f"--to-timestamp {text!r}: give a time zone (e.g. Z or +00:00)")
    return int(moment.timestamp() * 1000)


def reset_offsets(args: argparse.Namespace) -> int:
    try:
        request = _reset_request(args)
    except ValueError as exc:
        return _fail(str(exc))
    if args.group:
        return _offline_reset(args, request)
    response = _rpc(args, "ResetOffsets", request)
    if isinstance(response, int):
        return response
    assert isinstance(response, pb.ResetOffsetsResponse)
    changes = [(c.topic, c.partition, c.old_offset, c.new_offset) for c in response.changes]
    _print_changes(changes, args.dry_run)
    if response.not_owned:
        owned_elsewhere = ", ".join(f"{p.topic}[{p.partition}]" for p in response.not_owned)
        print(f"not owned by this sidecar, left untouched: {owned_elsewhere}")
    return 0


def _offline_reset(args: argparse.Namespace, request: pb.ResetOffsetsRequest) -> int:
    from aiokafka.errors import KafkaConnectionError

    from sidecar.auth import AuthError, client_kwargs, connection_failure
    from sidecar.offsets import OffsetsError, offline_reset

    if not args.config:
        return _fail("reset-offsets --group needs --config (for how to reach Kafka)")
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        return _fail(f"invalid config: {exc}")
    topics = args.topic or sorted(
        {t for s in config.subscriptions if s.group_id == args.group for t in s.topics}
    )
    if not topics:
        return _fail(
            f"no --topic given and no subscription in the config uses group {args.group!r}"
        )

    async def run() -> list[tuple[str, int, int, int]]:
        kwargs = client_kwargs(config.kafka)
        try:
            changes = await offline_reset(kwargs, args.group, topics, request)
        except KafkaConnectionError as exc:
            why, _ = await connection_failure(exc, kwargs)
            raise OffsetsError(f"cannot reach Kafka: {why}") from exc
        return [(c.topic, c.partition, c.old, c.new) for c in changes]

    try:
        changes = asyncio.run(run())
    except (OffsetsError, AuthError) as exc:
        return _fail(str(exc))
    _print_changes(changes, args.dry_run)
    return 0


def _print_changes(changes: list[tuple[str, int, int, int]], dry_run: bool) -> None:
    rows = [("TOPIC", "PARTITION", "OLD", "NEW")]
    rows += [(t, str(p), str(old) if old >= 0 else "-", str(new)) for t, p, old, new in changes]
    _table(rows, sys.stdout)
    print("dry run: nothing changed" if dry_run else f"reset {len(changes)} partition(s)")
