"""What the sidecar delivers, records in batches, and how the app settles them.

A batch and its records remember the stream that delivered them, because only that stream
can settle them: the sidecar takes a stream's unsettled records back when it ends. Each
remembers being settled too, so that settling twice sends nothing the second time.

An ack may carry outputs (consume-transform-produce): records the sidecar produces for the
records that ack settles, which it settles only once the outputs are written. That is why an
ack with outputs refuses what an ack without them shrugs off: settling a record twice is
harmless, but outputs on an ack that settles nothing would never be written.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
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


@dataclass(frozen=True, slots=True)
class Output:
    """A record for the sidecar to produce when it settles the records of an ack.

    Pass outputs to ``batch.ack(outputs=...)``, ``record.ack(outputs=...)`` or
    ``consumer.ack(..., outputs=...)``. They belong to the records that ack settles: the
    sidecar settles those records only once their outputs are written, so a crash between
    the two never loses an output.

    - With the subscription's ``transactions: {enabled: true, ...}`` the outputs and the
      commit of the consumed offsets are one Kafka transaction: a ``read_committed`` reader
      of the output topics sees each output exactly once. Batches then hold one partition,
      and an ack with outputs must name records of one partition only
      (``consumer.opened.transactional`` says whether this is the mode in force).
    - Without transactions they are produced idempotently (acks=all) before the records
      settle: at least once (a crash after the write, before the commit, writes them again).

    Outputs that cannot be written send their records back for redelivery, as a nack would
    (to the dead-letter topic after ``retry.max_attempts``).

    `value` None is a tombstone and `key` None a null key (both distinct from empty bytes).
    `headers` are (key, value) pairs like :attr:`Record.headers`, in order, duplicates kept,
    a None value a null header value, so ``headers=record.headers`` forwards them.
    `partition` None lets the producer's partitioner choose (by key).
    """

    topic: str
    value: bytes | None = None
    key: bytes | None = None
    headers: Sequence[tuple[str, bytes | None]] = ()
    partition: int | None = None

    def __post_init__(self) -> None:
        # Checked here, where the mistake is made, rather than in the ack that carries it:
        # by then the app has moved on, and its records would be redelivered again and again.
        if not isinstance(self.topic, str) or not self.topic:
            raise ValueError(f"Output.topic must be a topic name, not {self.topic!r}")
        for name in ("value", "key"):
            if not isinstance(getattr(self, name), bytes | None):
                raise TypeError(
                    f"Output.{name} must be bytes or None, not {type(getattr(self, name)).__name__}"
                )
        headers = tuple((k, v) for k, v in self.headers)  # a list or generator, frozen
        for k, v in headers:
            if not isinstance(k, str) or not isinstance(v, bytes | None):
                raise TypeError(f"Output header ({k!r}, {v!r}) must be (str, bytes | None)")
        object.__setattr__(self, "headers", headers)
        if self.partition is not None and (
            isinstance(self.partition, bool)
            or not isinstance(self.partition, int)
            or not 0 <= self.partition < 2**31
        ):
            raise ValueError(
                f"Output.partition must be a partition number or None, not {self.partition!r}"
            )

    def to_pb(self) -> pb.OutputRecord:
        """The wire message (absent fields for the None values)."""
        return pb.OutputRecord(
            topic=self.topic,
            key=self.key,
            value=self.value,
            headers=[pb.Header(key=k, value=v) for k, v in self.headers],
            partition=self.partition,
        )


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

    async def ack(self, *, outputs: Iterable[Output] = ()) -> None:
        """Done with this record: once all before it are settled too, it is committed.

        `outputs` are records for the sidecar to produce for this one: it is settled only
        once they are written (see :class:`Output`). Acking a settled record again sends
        nothing, but with outputs it raises ValueError: they would never be written.
        """
        request = pb.ConsumeRequest(
            ack=pb.Ack(records=[_ref_pb(self)], outputs=outputs_pb(outputs))
        )
        if self.settled:
            _settled_already(self, request.ack.outputs)
            return
        self._settled = True
        await self._batch._conn.send(request, self._batch)

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

    async def ack(self, *, outputs: Iterable[Output] = ()) -> None:
        """Settle every record of the batch not settled one by one already.

        `outputs` are records for the sidecar to produce for the records this settles: they
        are settled only once the outputs are written (see :class:`Output`). Acking a
        settled batch again sends nothing, but with outputs it raises ValueError: they
        would never be written.

        Raises StreamLostError when the batch's stream has ended (see `kafkasidecar.client`).
        """
        request = pb.ConsumeRequest(ack=pb.Ack(batch_ids=[self.id], outputs=outputs_pb(outputs)))
        if self.settled:
            _settled_already(self, request.ack.outputs)
            return
        self._settled = True
        await self._conn.send(request, self)

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


class _Claim(NamedTuple):
    """What one stream's request settles: batch ids, record refs, and the items themselves."""

    batch_ids: list[int]
    refs: list[pb.RecordRef]
    items: list[Batch | Record]


async def settle(
    items: Iterable[Batch | Record | Iterable[Batch | Record]],
    build: Callable[[list[int], list[pb.RecordRef]], pb.ConsumeRequest],
) -> None:
    """Settles batches and records, maybe of several streams, with one request per stream.

    Those still open are sent even if some belong to a lost stream; then StreamLostError is
    raised for the lost ones.
    """
    await _send(_claim(items), build)


async def ack_with_outputs(
    items: Iterable[Batch | Record | Iterable[Batch | Record]], outputs: Iterable[Output]
) -> None:
    """Acks batches and records with outputs: one request, so all of one stream.

    The outputs belong to everything that request settles, and only one stream can settle
    it, so items of several streams are refused, as is an ack that would settle nothing (its
    outputs would never be written) and, on a transactional stream, records of several
    partitions (the sidecar would reject them, and they would wait out their ack deadline).
    Nothing is marked settled when it raises, so the app may settle the items otherwise.
    """
    outs = outputs_pb(outputs)  # bad outputs raise before anything is marked settled
    claimed = _claim(items)
    try:
        if not claimed:
            raise ValueError("an ack with outputs must settle something: all was settled already")
        if len(claimed) > 1:
            raise ValueError(
                "an ack with outputs must name batches and records of one stream only, "
                f"not of {len(claimed)}: the outputs belong to the one request that settles them"
            )
        ((conn, claim),) = claimed.items()
        if conn.transactional:
            partitions = {
                (r.topic, r.partition)
                for item in claim.items
                for r in (item.records if isinstance(item, Batch) else [item])
            }
            if len(partitions) > 1:
                raise ValueError(
                    "on a transactional subscription an ack with outputs must name records "
                    f"of one partition only, not of {len(partitions)}: {sorted(partitions)}"
                )
    except ValueError:
        _unclaim(claimed)
        raise
    await _send(
        claimed,
        lambda ids, refs: pb.ConsumeRequest(ack=pb.Ack(batch_ids=ids, records=refs, outputs=outs)),
    )


def _claim(
    items: Iterable[Batch | Record | Iterable[Batch | Record]],
) -> dict[Connection, _Claim]:
    """Marks the unsettled items settled, grouped by the stream that can settle them."""
    by_conn: dict[Connection, _Claim] = {}
    for item in _flatten(items):
        if item.settled:
            continue
        if isinstance(item, Batch):
            claim = by_conn.setdefault(item._conn, _Claim([], [], []))
            claim.batch_ids.append(item.id)
        else:
            claim = by_conn.setdefault(item._batch._conn, _Claim([], [], []))
            claim.refs.append(_ref_pb(item))
        claim.items.append(item)
        item._settled = True
    return by_conn


def _unclaim(claimed: dict[Connection, _Claim]) -> None:
    for claim in claimed.values():
        for item in claim.items:
            item._settled = False


async def _send(
    claimed: dict[Connection, _Claim],
    build: Callable[[list[int], list[pb.RecordRef]], pb.ConsumeRequest],
) -> None:
    lost: list[StreamLostError] = []
    for conn, claim in claimed.items():
        try:
            await conn.send(build(claim.batch_ids, claim.refs))
        except StreamLostError as exc:
            lost.append(exc)
    if lost:
        raise lost[0]


def outputs_pb(outputs: Iterable[Output]) -> list[pb.OutputRecord]:
    """The wire messages of an ack's outputs; raises TypeError for anything but Outputs."""
    if isinstance(outputs, Output):
        raise TypeError("outputs= takes a list of Output, not one Output")
    result = []
    for output in outputs:
        if not isinstance(output, Output):
            raise TypeError(f"outputs= takes Output values, not {type(output).__name__}")
        result.append(output.to_pb())
    return result


def _settled_already(item: Batch | Record, outputs: Sequence[pb.OutputRecord]) -> None:
    """Settling again sends nothing; with outputs that would drop them, so it is an error."""
    if outputs:
        raise ValueError(
            f"{item!r} was settled already: an ack with outputs must settle something, "
            "or its outputs would never be written"
        )


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
