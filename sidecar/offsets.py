"""Offset resets: where a group subscription starts again (earliest, latest, a timestamp, or
explicit offsets), live through a running sidecar or offline for a stopped group."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.structs import OffsetAndMetadata

from kafkasidecar.v1 import consumer_pb2 as pb
from sidecar.consumer import close_consumer


class OffsetsError(Exception):
    """A reset that cannot be done; `code` says which gRPC status fits."""

    def __init__(self, message: str, code: str = "INVALID_ARGUMENT") -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class Change:
    topic: str
    partition: int
    old: int
    new: int

    def to_pb(self) -> pb.OffsetChange:
        return pb.OffsetChange(
            topic=self.topic, partition=self.partition, old_offset=self.old, new_offset=self.new
        )


def selected_partitions(
    request: pb.ResetOffsetsRequest, topics: Sequence[str], partitions: Iterable[TopicPartition]
) -> set[TopicPartition]:
    """The partitions a request names: its explicit offsets, or every partition of its
    topics (default: all of the subscription's)."""
    allowed = set(topics)
    if request.target == pb.RESET_TARGET_OFFSETS:
        if not request.offsets:
            raise OffsetsError("target OFFSETS needs at least one topic/partition/offset")
        chosen = {TopicPartition(o.topic, o.partition) for o in request.offsets}
    else:
        wanted = set(request.topics) or allowed
        chosen = {tp for tp in partitions if tp.topic in wanted}
        if unknown := wanted - allowed:
            raise OffsetsError(f"topics not in this subscription: {sorted(unknown)}")
    if stray := {tp.topic for tp in chosen} - allowed:
        raise OffsetsError(f"topics not in this subscription: {sorted(stray)}")
    if not chosen:
        raise OffsetsError("no partitions to reset")
    return chosen


async def target_offsets(
    consumer: AIOKafkaConsumer, tps: Sequence[TopicPartition], request: pb.ResetOffsetsRequest
) -> dict[TopicPartition, int]:
    """Where each partition goes, checked against the log's bounds."""
    if not tps:
        return {}
    target = request.target
    beginnings: dict[TopicPartition, int] = await consumer.beginning_offsets(list(tps))
    ends: dict[TopicPartition, int] = await consumer.end_offsets(list(tps))
    if target == pb.RESET_TARGET_EARLIEST:
        return beginnings
    if target == pb.RESET_TARGET_LATEST:
        return ends
    if target == pb.RESET_TARGET_TIMESTAMP:
        if request.timestamp_ms < 0:
            raise OffsetsError("timestamp_ms must be >= 0")
        found = await consumer.offsets_for_times({tp: request.timestamp_ms for tp in tps})
        # No record at or after the time: the partition starts at its end.
        return {tp: found[tp].offset if found.get(tp) else ends[tp] for tp in tps}
    if target == pb.RESET_TARGET_OFFSETS:
        wanted = {TopicPartition(o.topic, o.partition): o.offset for o in request.offsets}
        for tp, offset in wanted.items():
            if tp not in ends:
                raise OffsetsError(f"{tp.topic}[{tp.partition}] does not exist")
            if not beginnings[tp] <= offset <= ends[tp]:
                raise OffsetsError(
                    f"offset {offset} of {tp.topic}[{tp.partition}] is outside the log "
                    f"[{beginnings[tp]}, {ends[tp]}]"
                )
        return {tp: wanted[tp] for tp in tps}
    raise OffsetsError("target is required: EARLIEST, LATEST, TIMESTAMP or OFFSETS")


async def committed(
    consumer: AIOKafkaConsumer, tps: Iterable[TopicPartition]
) -> dict[TopicPartition, int]:
    """The group's committed offsets, -1 where there is none: one OffsetFetch for all of
    them (aiokafka's public `committed()` asks once per partition)."""
    tps = list(tps)
    found = await consumer._coordinator.fetch_committed_offsets(tps)
    return {tp: found[tp].offset if tp in found and found[tp].offset >= 0 else -1 for tp in tps}


async def offline_reset(
    client_kwargs: dict[str, Any],
    group_id: str,
    topics: Sequence[str],
    request: pb.ResetOffsetsRequest,
) -> list[Change]:
    """Resets a stopped group's offsets. Kafka's own rule applies: only an empty group."""
    admin = AIOKafkaAdminClient(**client_kwargs)
    await admin.start()
    try:
        (response,) = await admin.describe_consumer_groups([group_id])
        (group,) = response.groups
        state, members = group[2], group[5]
    finally:
        await admin.close()
    if members:
        raise OffsetsError(
            f"group {group_id!r} is not empty (state {state}, {len(members)} member(s)): Kafka "
            "resets offsets only for an empty group; stop its sidecars first, or reset live "
            "through a running sidecar (without --group)",
            code="FAILED_PRECONDITION",
        )
    consumer = AIOKafkaConsumer(group_id=group_id, enable_auto_commit=False, **client_kwargs)
    await consumer.start()
    try:
        await consumer._client.force_metadata_update()
        partitions = [
            TopicPartition(topic, partition)
            for topic in topics
            for partition in consumer.partitions_for_topic(topic) or ()
        ]
        missing = [t for t in topics if not consumer.partitions_for_topic(t)]
        if missing:
            raise OffsetsError(f"topics do not exist: {missing}", code="NOT_FOUND")
        tps = sorted(selected_partitions(request, topics, partitions))
        targets = await target_offsets(consumer, tps, request)
        old = await committed(consumer, tps)
        if not request.dry_run:
            consumer.assign(tps)
            await consumer.commit({tp: OffsetAndMetadata(targets[tp], "") for tp in tps})
        return [Change(tp.topic, tp.partition, old[tp], targets[tp]) for tp in tps]
    finally:
        await close_consumer(consumer)
