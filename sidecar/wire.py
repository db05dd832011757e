"""The protobuf forms of what the state machine decides: batches, refusals, partitions.

Kept apart from the dispatcher so that the rules (inflight.py) and the asyncio shell
(dispatcher.py) say nothing about the wire, and the wire format is changed in one place.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

from kafka_sidecar_transcoder import batch_bytes

from kafkasidecar.v1 import consumer_pb2 as pb
from sidecar.batcher import TopicPartition
from sidecar.inflight import Batch, Pending, RecordRef, Refusal, Refused

MODES = {"group": pb.SUBSCRIPTION_MODE_GROUP, "snapshot": pb.SUBSCRIPTION_MODE_SNAPSHOT}
ORDERINGS = {
    "partition": pb.ORDERING_PARTITION,
    "key": pb.ORDERING_KEY,
    "none": pb.ORDERING_NONE,
}
NACK_ACTIONS = (pb.NACK_ACTION_UNSPECIFIED, pb.NACK_ACTION_RETRY, pb.NACK_ACTION_DEAD_LETTER)
_REASONS = {
    Refusal.UNKNOWN: pb.REJECT_REASON_UNKNOWN,
    Refusal.ALREADY_SETTLED: pb.REJECT_REASON_ALREADY_SETTLED,
    Refusal.REVOKED: pb.REJECT_REASON_REVOKED,
    Refusal.INVALID: pb.REJECT_REASON_INVALID,
    Refusal.EXPIRED: pb.REJECT_REASON_EXPIRED,
}


def batch(batch: Batch) -> bytes:
    """The `ConsumeResponse` bytes of a batch, straight from the records' `Record` bytes as
    fetched (the transcoder's): no protobuf object per record, here or anywhere before."""
    return batch_bytes(
        batch.id,
        [(p.fetch.wire, p.fetch.ends, p.lo, p.hi, p.attempts) for p in batch.records],
        response=True,
    )


class Message(NamedTuple):
    """One record as the dead-letter writer and tracing read it (the fields of aiokafka's
    ConsumerRecord they use): parsed from its `Record` bytes, off the hot path."""

    topic: str
    partition: int
    offset: int
    timestamp: int
    #: 0 create time, 1 log-append time (aiokafka's numbering).
    timestamp_type: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes | None], ...]


def message(pending: Pending) -> Message:
    """The first (for a dead letter or a traced record: the only) record of a run."""
    record = pb.Record.FromString(pending.record())
    return Message(
        record.topic,
        record.partition,
        record.offset,
        record.timestamp_ms,
        max(record.timestamp_type - 1, 0),
        record.key if record.HasField("key") else None,
        record.value if record.HasField("value") else None,
        tuple((h.key, h.value if h.HasField("value") else None) for h in record.headers),
    )


def refs(refs: Iterable[pb.RecordRef]) -> list[RecordRef]:
    return [(ref.topic, ref.partition, ref.offset) for ref in refs]


def rejections(refused: Refused) -> list[pb.ConsumeResponse]:
    """One `rejected` per reason for the refused parts of an ack or nack."""
    return [
        pb.ConsumeResponse(
            rejected=pb.Rejected(
                reason=_REASONS[why],
                batch_ids=refused.batches.get(why, ()),
                records=[
                    pb.RecordRef(topic=t, partition=p, offset=o)
                    for t, p, o in refused.records.get(why, ())
                ],
                message=refused.message or why.value,
            )
        )
        for why in {**refused.batches, **refused.records}
    ]


def assigned(tps: Iterable[TopicPartition]) -> pb.ConsumeResponse:
    return pb.ConsumeResponse(partitions_assigned=pb.PartitionsAssigned(partitions=_tps(tps)))


def revoked(tps: Iterable[TopicPartition]) -> pb.ConsumeResponse:
    return pb.ConsumeResponse(partitions_revoked=pb.PartitionsRevoked(partitions=_tps(tps)))


def _tps(tps: Iterable[TopicPartition]) -> list[pb.TopicPartition]:
    return [pb.TopicPartition(topic=t, partition=p) for t, p in sorted(tps)]
