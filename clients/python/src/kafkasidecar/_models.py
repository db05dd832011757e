"""What the sidecar delivers, records in batches, and how the app settles them.

A batch and its records remember the stream that delivered them, because only that stream
can settle them: the sidecar takes a stream's unsettled records back when it ends. Each
remembers being settled too, so that settling twice sends nothing the second time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, NamedTuple

from kafkasidecar._exceptions import StreamLostError
from kafkasidecar.v1 import consumer_pb2 as pb

if TYPE_CHECKING:
    from kafkasidecar._connection import Connection


class TopicPartition(NamedTuple):
    topic: str
    partition: int


class RecordRef(NamedTuple):
    """A record's coordinates: what acks, nacks and rejections name."""

    topic: str
    partition: int
    offset: int


class Record:
    """One Kafka record of a batch, with accessors that turn proto presence into ``None``."""

    __slots__ = ("_batch", "_settled", "pb")

    def __init__(self, batch: Batch, record: pb.Record) -> None:
        self._batch = batch
        self._settled = False
        #: The wire message, for anything the accessors do not cover.
        self.pb = record

    @property
    def topic(self) -> str:
        return self.pb.topic

    @property
    def partition(self) -> int:
        return self.pb.partition

    @property
    def offset(self) -> int:
        return self.pb.offset

    @property
    def key(self) -> bytes | None:
        """None for a null key (distinct from an empty one)."""
        return self.pb.key if self.pb.HasField("key") else None

    @property
    def value(self) -> bytes | None:
        """None for a tombstone (distinct from an empty value)."""
        return self.pb.value if self.pb.HasField("value") else None

    @property
    def headers(self) -> list[tuple[str, bytes | None]]:
        """In record order, duplicates kept; None for a null header value."""
        return [(h.key, h.value if h.HasField("value") else None) for h in self.pb.headers]

    @property
    def timestamp_ms(self) -> int:
        return self.pb.timestamp_ms

    @property
    def delivery_attempt(self) -> int:
        """1 on first delivery, +1 on each redelivery (nack, ack deadline, lost stream)."""
        return self.pb.delivery_attempt

    @property
    def ref(self) -> RecordRef:
        return RecordRef(self.pb.topic, self.pb.partition, self.pb.offset)

    @property
    def batch(self) -> Batch:
        return self._batch

    @property
    def settled(self) -> bool:
        """Acked or nacked through this client (by record or with its batch)."""
        return self._settled or self._batch._settled

    async def ack(self) -> None:
        """Done with this record: once all before it are settled too, it is committed."""
        if self.settled:
            return
        self._settled = True
        await self._batch._conn.send(
            pb.ConsumeRequest(ack=pb.Ack(records=[_ref_pb(self)])), self._batch
        )

    async def nack(
        self, *, retry_after_ms: int = 0, reason: str = "", dead_letter: bool = False
    ) -> None:
        """Give the record back: redelivered after backoff, or to the DLQ with `dead_letter`.

        `reason` goes into the dead letter's ``x-dlq-reason`` header; `retry_after_ms` = 0
        uses the subscription's backoff policy.
        """
        if self.settled:
            return
        self._settled = True
        await self._batch._conn.send(
            pb.ConsumeRequest(
                nack=nack_pb([], [_ref_pb(self)], retry_after_ms, reason, dead_letter)
            ),
            self._batch,
        )

    def __repr__(self) -> str:
        return (
            f"Record({self.topic}[{self.partition}]@{self.offset}, "
            f"attempt={self.delivery_attempt}, settled={self.settled})"
        )


class Batch:
    """Records the sidecar sent together; settle them all at once or one by one."""

    __slots__ = ("_conn", "_settled", "pb", "records")

    def __init__(self, conn: Connection, batch: pb.Batch) -> None:
        self._conn = conn
        self._settled = False
        #: The wire message.
        self.pb = batch
        self.records: list[Record] = [Record(self, r) for r in batch.records]

    @property
    def id(self) -> int:
        """Unique per stream (not across reconnects)."""
        return self.pb.batch_id

    @property
    def stream_id(self) -> str:
        return self._conn.stream_id

    @property
    def alive(self) -> bool:
        """Whether its stream is still open, i.e. whether it can still be settled."""
        return self._conn.alive

    @property
    def settled(self) -> bool:
        return self._settled or all(r._settled for r in self.records)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records)

    async def ack(self) -> None:
        """Settle every record of the batch not settled one by one already.

        Raises StreamLostError when the batch's stream has ended (see `kafkasidecar.client`).
        """
        if self.settled:
            return
        self._settled = True
        await self._conn.send(pb.ConsumeRequest(ack=pb.Ack(batch_ids=[self.id])), self)

    async def nack(
        self, *, retry_after_ms: int = 0, reason: str = "", dead_letter: bool = False
    ) -> None:
        """Give back every record not settled yet: for redelivery, or to the DLQ."""
        if self.settled:
            return
        self._settled = True
        await self._conn.send(
            pb.ConsumeRequest(nack=nack_pb([self.id], [], retry_after_ms, reason, dead_letter)),
            self,
        )

    def __repr__(self) -> str:
        return f"Batch(id={self.id}, records={len(self.records)}, stream={self.stream_id!r})"


async def settle(
    items: Iterable[Batch | Record | Iterable[Batch | Record]],
    build: Callable[[list[int], list[pb.RecordRef]], pb.ConsumeRequest],
) -> None:
    """Settles batches and records, maybe of several streams, with one request per stream.

    Those still open are sent even if some belong to a lost stream; then StreamLostError is
    raised for the lost ones.
    """
    by_conn: dict[Connection, tuple[list[int], list[pb.RecordRef]]] = {}
    for item in _flatten(items):
        if item.settled:
            continue
        if isinstance(item, Batch):
            conn = item._conn
            by_conn.setdefault(conn, ([], []))[0].append(item.id)
        else:
            conn = item._batch._conn
            by_conn.setdefault(conn, ([], []))[1].append(_ref_pb(item))
        item._settled = True
    lost: list[StreamLostError] = []
    for conn, (ids, refs) in by_conn.items():
        try:
            await conn.send(build(ids, refs))
        except StreamLostError as exc:
            lost.append(exc)
    if lost:
        raise lost[0]


def nack_pb(
    batch_ids: Sequence[int],
    records: Sequence[pb.RecordRef],
    retry_after_ms: int,
    reason: str,
    dead_letter: bool,
) -> pb.Nack:
    return pb.Nack(
        batch_ids=batch_ids,
        records=records,
        action=pb.NACK_ACTION_DEAD_LETTER if dead_letter else pb.NACK_ACTION_RETRY,
        reason=reason,
        retry_after_ms=retry_after_ms,
    )


def _ref_pb(record: Record) -> pb.RecordRef:
    return pb.RecordRef(
        topic=record.pb.topic, partition=record.pb.partition, offset=record.pb.offset
    )


def _flatten(
    items: Iterable[Batch | Record | Iterable[Batch | Record]],
) -> Iterator[Batch | Record]:
    for item in items:
        if isinstance(item, Batch | Record):
            yield item
        else:
            yield from item
