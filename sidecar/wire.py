"""The protobuf forms of what the state machine decides: batches, refusals, partitions.

Kept apart from the dispatcher so that the rules (inflight.py) and the asyncio shell
(dispatcher.py) say nothing about the wire, and the wire format is changed in one place.
"""

from __future__ import annotations

from collections.abc import Iterable

from kafkasidecar.v1 import consumer_pb2 as pb
from sidecar.batcher import TopicPartition
from sidecar.inflight import Batch, RecordRef, Refusal, Refused

MODES = {"group": pb.SUBSCRIPTION_MODE_GROUP, "snapshot": pb.SUBSCRIPTION_MODE_SNAPSHOT}
ORDERINGS = {"partition": pb.ORDERING_PARTITION, "none": pb.ORDERING_NONE}
NACK_ACTIONS = (pb.NACK_ACTION_UNSPECIFIED, pb.NACK_ACTION_RETRY, pb.NACK_ACTION_DEAD_LETTER)
_REASONS = {
    Refusal.UNKNOWN: pb.REJECT_REASON_UNKNOWN,
    Refusal.ALREADY_SETTLED: pb.REJECT_REASON_ALREADY_SETTLED,
    Refusal.REVOKED: pb.REJECT_REASON_REVOKED,
    Refusal.INVALID: pb.REJECT_REASON_INVALID,
    Refusal.EXPIRED: pb.REJECT_REASON_EXPIRED,
}


def batch(batch: Batch) -> pb.ConsumeResponse:
    """A batch's records, built in place in the message (building each record once and
    copying it in costs more). Absent key/value/header value mean null, so they are only set
    when present."""
    wire = pb.Batch(batch_id=batch.id)
    add = wire.records.add
    for pending in batch.records:
        message = pending.message
        record = add(
            topic=message.topic,
            partition=message.partition,
            offset=message.offset,
            timestamp_ms=message.timestamp,
            timestamp_type=message.timestamp_type + 1,
            delivery_attempt=pending.attempts,
        )
        if message.key is not None:
            record.key = message.key
        if message.value is not None:
            record.value = message.value
        for hkey, hvalue in message.headers:
            header = record.headers.add(key=hkey)
            if hvalue is not None:
                header.value = hvalue
    return pb.ConsumeResponse(batch=wire)


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
