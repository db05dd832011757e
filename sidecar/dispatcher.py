"""Hands fetched records to the app's streams, and applies what the app says back.

One dispatcher per subscription. Records come in from the consumer, wait in the backlog,
and go out as batches to streams with free window; acks settle them in the ledger (which
moves commits), nacks and expired ack deadlines send them back to the backlog. Everything
here runs on the event loop without awaiting, so no locks: a stream's outbox is an unbounded
queue whose size the window bounds.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from kafkasidecar.v1 import consumer_pb2 as pb
from sidecar import __version__
from sidecar.batcher import Backlog, BatchLimits, Pending, TopicPartition
from sidecar.config import SubscriptionConfig
from sidecar.deadletters import DeadLetter
from sidecar.ledger import Ledger, SettleOutcome
from sidecar.tracing import Tracing

log = logging.getLogger("sidecar.dispatcher")

MODES = {"group": pb.SUBSCRIPTION_MODE_GROUP, "snapshot": pb.SUBSCRIPTION_MODE_SNAPSHOT}
_ORDERINGS = {"partition": pb.ORDERING_PARTITION, "none": pb.ORDERING_NONE}
#: How many ended-unsettled batch ids a stream remembers, to say why a late ack is refused.
_CLOSED_BATCH_MEMORY = 10_000


@dataclass(slots=True)
class DispatchStats:
    """Running totals for metrics: plain ints, so the hot path pays no metrics library."""

    #: Records sent to apps, redeliveries included.
    delivered: int = 0
    #: Of those, deliveries after the first (retry, ack deadline, stream loss).
    redelivered: int = 0
    acked: int = 0
    nacked_retry: int = 0
    nacked_dead_letter: int = 0
    #: Records whose ack deadline passed (then retried or dead-lettered).
    deadline_expired: int = 0
    #: Records handed back because their stream ended unsettled.
    stream_lost: int = 0
    #: Refs in acks/nacks that were refused (unknown, already settled, revoked, invalid).
    rejected: int = 0
    #: Records fetched again but not delivered: settled before a restart or rebalance, as
    #: the commit's metadata said.
    skipped: int = 0


@dataclass(slots=True, eq=False)
class _Batch:
    id: int
    deadline: float
    #: Records of this batch not yet settled (nor taken back), by (topic, partition, offset).
    records: dict[tuple[str, int, int], Pending]


@dataclass(eq=False)
class Stream:
    """One app stream: its window, what it holds, and its outbox."""

    id: str
    client_id: str
    max_batches: int
    max_records: int
    max_bytes: int
    outbox: asyncio.Queue[pb.ConsumeResponse | None] = field(default_factory=asyncio.Queue)
    batches: dict[int, _Batch] = field(default_factory=dict)
    #: (topic, partition, offset) -> batch id, for acks by record.
    index: dict[tuple[str, int, int], int] = field(default_factory=dict)
    out_records: int = 0
    out_bytes: int = 0
    next_batch_id: int = 1
    draining: bool = False
    closed_batches: dict[int, int] = field(default_factory=dict)

    def room(self) -> tuple[int, int] | None:
        """(records, bytes) it can still take in one batch, or None when its window is full."""
        if self.draining or len(self.batches) >= self.max_batches:
            return None
        records = self.max_records - self.out_records
        size = self.max_bytes - self.out_bytes
        if records <= 0 or (size <= 0 and self.out_records):
            return None
        # A record larger than the whole window still goes out, alone, to an idle stream.
        return records, max(size, 1)

    def send(self, message: pb.ConsumeResponse) -> None:
        self.outbox.put_nowait(message)


def to_pending(message: Any, now: float) -> Pending:
    """A fetched record, sized for the flow-control windows (key, value and headers)."""
    key, value = message.key, message.value
    size = (len(key) if key else 0) + (len(value) if value else 0)
    for hkey, hvalue in message.headers:
        size += len(hkey) + (len(hvalue) if hvalue else 0)
    return Pending(
        tp=(message.topic, message.partition),
        offset=message.offset,
        size=size,
        message=message,
        since=now,
    )


def _add_record(batch: pb.Batch, pending: Pending) -> None:
    """The record's wire form, built in place in the batch: absent key/value/header value
    mean null, so they are only set when present."""
    message = pending.message
    record = batch.records.add(
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


class Dispatcher:
    """Backlog → batches → streams, and acks/nacks → ledger, for one subscription."""

    def __init__(
        self,
        config: SubscriptionConfig,
        ledger: Ledger,
        *,
        group_id: str = "",
        dead_letters: asyncio.Queue[DeadLetter] | None = None,
        stats: DispatchStats | None = None,
        tracing: Tracing | None = None,
        stream_ids: Iterator[int] | None = None,
    ) -> None:
        self.config = config
        self.ledger = ledger
        self.group_id = group_id
        #: Where records go that the app gave up on; None when no dead_letter topic is set.
        self.dead_letters = dead_letters
        self.backlog = Backlog(
            BatchLimits(
                config.batch.max_records, config.batch.max_bytes, config.batch.max_wait_ms / 1000
            ),
            ordered=config.ordering == "partition",
        )
        self.streams: dict[str, Stream] = {}
        self.assigned: set[TopicPartition] = set()
        #: Partitions revoked since they were last assigned: acks for them say REVOKED.
        self.revoked: set[TopicPartition] = set()
        #: Partitions being revoked: no new deliveries, acks still welcome (revoke grace).
        self.revoking: set[TopicPartition] = set()
        #: Records out with the app or on their way to the DLQ, per partition.
        self._inflight: dict[TopicPartition, int] = {}
        #: Set whenever a stream attaches or detaches (the group membership follows streams).
        self.streams_changed = asyncio.Event()
        #: Set whenever batches went out: the backlog has room again (resume fetching).
        self.drained = asyncio.Event()
        #: Per partition, [start, end) offset ranges settled under a previous owner (from the
        #: committed offset's metadata): fetched again, they are settled, not delivered.
        self._skip: dict[TopicPartition, list[tuple[int, int]]] = {}
        #: Shared by a snapshot subscription's per-stream dispatchers: stream ids stay unique.
        self._stream_ids = stream_ids or itertools.count(1)
        self._wake = asyncio.Event()
        self._closing = False
        #: May be shared: a snapshot subscription's per-stream dispatchers add up into one.
        self.stats = stats or DispatchStats()
        self.tracing = tracing

    # -- streams ---------------------------------------------------------------------------

    def attach(self, request: pb.Open, peer: str) -> Stream:
        window = self.config.window

        def limit(asked: int, cap: int) -> int:
            return min(asked, cap) if asked > 0 else cap

        stream = Stream(
            id=f"{self.config.name}-{next(self._stream_ids)}",
            client_id=request.client_id or peer,
            max_batches=limit(request.max_outstanding_batches, window.max_outstanding_batches),
            max_records=limit(request.max_outstanding_records, window.max_outstanding_records),
            max_bytes=limit(request.max_outstanding_bytes, window.max_outstanding_bytes),
        )
        stream.send(
            pb.ConsumeResponse(
                opened=pb.Opened(
                    subscription=self.config.name,
                    group_id=self.group_id,
                    mode=MODES[self.config.mode],
                    ordering=_ORDERINGS[self.config.ordering],
                    max_outstanding_batches=stream.max_batches,
                    max_outstanding_records=stream.max_records,
                    max_outstanding_bytes=stream.max_bytes,
                    batch_max_records=self.config.batch.max_records,
                    batch_max_bytes=self.config.batch.max_bytes,
                    batch_max_wait_ms=self.config.batch.max_wait_ms,
                    ack_deadline_ms=self.config.ack_deadline_ms,
                    version=__version__,
                    stream_id=stream.id,
                )
            )
        )
        if self.assigned:
            stream.send(
                pb.ConsumeResponse(
                    partitions_assigned=pb.PartitionsAssigned(partitions=_tps(self.assigned))
                )
            )
        self.streams[stream.id] = stream
        self.streams_changed.set()
        log.info(
            "stream attached",
            extra={"subscription": self.config.name, "stream": stream.id, "client": peer},
        )
        self._wake.set()
        return stream

    def detach(self, stream: Stream) -> None:
        """The stream ended: what it held goes back to the backlog for another stream."""
        if self.streams.pop(stream.id, None) is None:
            return
        self.streams_changed.set()
        now = time.monotonic()
        returned = 0
        for batch in stream.batches.values():
            for pending in batch.records.values():
                self._release(pending.tp)
                self._end_span(pending, "stream_lost")
                self.backlog.retry(pending, now)
                returned += 1
        self.stats.stream_lost += returned
        stream.batches.clear()
        stream.index.clear()
        log.info(
            "stream detached",
            extra={
                "subscription": self.config.name,
                "stream": stream.id,
                "redelivering": returned,
            },
        )
        self._wake.set()

    def drain(self, stream: Stream) -> None:
        stream.draining = True

    # -- from the consumer -----------------------------------------------------------------

    def add(self, tp: TopicPartition, records: list[Any]) -> None:
        """Fetched records of one partition, in offset order."""
        if not records or tp in self.revoking or tp not in self.assigned:
            # A revoking (or no longer owned) partition's records belong to its next owner;
            # not tracking them keeps the commit from passing them.
            return
        if self.ledger.partition(tp) is None:
            # The first record fetched after assignment is where this owner's ledger starts.
            self.ledger.assign(tp, records[0].offset)
        now = time.monotonic()
        ledger, backlog = self.ledger, self.backlog
        skip = self._skip.get(tp)
        for message in records:
            if skip and self._skipped(tp, skip, message.offset):
                continue
            pending = to_pending(message, now)
            ledger.track(tp, pending.offset)
            backlog.add(pending)
        self._wake.set()

    def skip(self, tp: TopicPartition, ranges: list[tuple[int, int]]) -> None:
        """Offsets of `tp` already settled (by an earlier owner): settle them when fetched."""
        self._skip[tp] = list(ranges)
        log.info(
            "skipping records settled before the last commit",
            extra={
                "subscription": self.config.name,
                "topic": tp[0],
                "partition": tp[1],
                "records": sum(end - start for start, end in ranges),
            },
        )

    def _skipped(self, tp: TopicPartition, skip: list[tuple[int, int]], offset: int) -> bool:
        """Settles `offset` at once if a skip range holds it. Ranges are consumed in order."""
        while skip and skip[0][1] <= offset:
            skip.pop(0)
        if not skip:
            del self._skip[tp]
            return False
        if skip[0][0] <= offset:
            self.ledger.track(tp, offset)
            self.ledger.settle(tp, offset)
            self.stats.skipped += 1
            return True
        return False

    def assign(self, tps: Iterable[TopicPartition]) -> None:
        tps = set(tps)
        self.assigned |= tps
        self.revoked -= tps
        self._broadcast(
            pb.ConsumeResponse(partitions_assigned=pb.PartitionsAssigned(partitions=_tps(tps)))
        )

    def begin_revoke(self, tps: Iterable[TopicPartition]) -> None:
        """Stops delivering these partitions; what the app holds may still be settled."""
        tps = set(tps) & self.assigned
        self.revoking |= tps
        self.backlog.drop(tps)

    def unsettled_in(self, tps: set[TopicPartition]) -> int:
        """Records of these partitions out with the app or on their way to the DLQ."""
        return sum(self._inflight.get(tp, 0) for tp in tps)

    def revoke(self, tps: Iterable[TopicPartition]) -> None:
        """Drops the partitions' records, buffered and in flight; the next owner gets them."""
        tps = set(tps)
        self.revoking -= tps
        tps &= self.assigned
        if not tps:
            return
        self.assigned -= tps
        self.revoked |= tps
        self._drop(tps)
        self._broadcast(
            pb.ConsumeResponse(partitions_revoked=pb.PartitionsRevoked(partitions=_tps(tps)))
        )

    def reset(self, tps: set[TopicPartition]) -> None:
        """The partitions' offsets were reset: what was fetched or in flight is void."""
        self._drop(tps & self.assigned)

    def _drop(self, tps: set[TopicPartition]) -> None:
        """Forgets the partitions' records, buffered and in flight; late acks are refused."""
        self.backlog.drop(tps)
        for stream in self.streams.values():
            for batch in list(stream.batches.values()):
                for key in [k for k in batch.records if (k[0], k[1]) in tps]:
                    pending = batch.records.pop(key)
                    self._end_span(pending, "revoked")
                    del stream.index[key]
                    stream.out_records -= 1
                    stream.out_bytes -= pending.size
                if not batch.records:
                    self._close_batch(stream, batch, pb.REJECT_REASON_REVOKED)
        for tp in tps:
            self._inflight.pop(tp, None)
            self._skip.pop(tp, None)
        self._wake.set()

    # -- from the app ----------------------------------------------------------------------

    def ack(self, stream: Stream, request: pb.Ack) -> None:
        rejected = _Rejections()
        for batch_id in request.batch_ids:
            batch = stream.batches.get(batch_id)
            if batch is None:
                rejected.batch(batch_id, self._why_no_batch(stream, batch_id))
                continue
            self._settle_batch(stream, batch)
        for ref in request.records:
            found = self._find(stream, ref)
            if isinstance(found, tuple):
                self._settle(stream, *found)
            else:
                rejected.record(ref, found)
        self.stats.rejected += rejected.send(stream)
        self._wake.set()

    def nack(self, stream: Stream, request: pb.Nack) -> None:
        rejected = _Rejections()
        dead_letter = request.action == pb.NACK_ACTION_DEAD_LETTER
        if request.action not in (
            pb.NACK_ACTION_UNSPECIFIED,
            pb.NACK_ACTION_RETRY,
            pb.NACK_ACTION_DEAD_LETTER,
        ) or (dead_letter and self.dead_letters is None):
            for batch_id in request.batch_ids:
                rejected.batch(batch_id, pb.REJECT_REASON_INVALID)
            for ref in request.records:
                rejected.record(ref, pb.REJECT_REASON_INVALID)
            self.stats.rejected += rejected.send(
                stream,
                f"subscription {self.config.name!r} has no dead_letter topic"
                if dead_letter
                else f"unknown nack action {request.action}",
            )
            return
        targets: list[tuple[_Batch, Pending]] = []
        for batch_id in request.batch_ids:
            batch = stream.batches.get(batch_id)
            if batch is None:
                rejected.batch(batch_id, self._why_no_batch(stream, batch_id))
                continue
            targets.extend((batch, p) for p in batch.records.values())
        for ref in request.records:
            found = self._find(stream, ref)
            if isinstance(found, tuple):
                targets.append(found)
            else:
                rejected.record(ref, found)
        now = time.monotonic()
        reason = request.reason or ("nacked" if dead_letter else "retries exhausted")
        if dead_letter:
            self.stats.nacked_dead_letter += len(targets)
        else:
            self.stats.nacked_retry += len(targets)
        for batch, pending in targets:
            self._take_back(stream, batch, pending, "dead_letter" if dead_letter else "retry")
            if dead_letter:
                self._dead_letter(pending, reason)
            else:
                self._retry(pending, now, request.retry_after_ms / 1000, reason)
        self.stats.rejected += rejected.send(stream)
        self._wake.set()

    def _retry(self, pending: Pending, now: float, delay: float, reason: str) -> None:
        """Back to the backlog after a backoff, or to the DLQ once attempts run out."""
        if pending.attempts >= self.config.retry.max_attempts and self.dead_letters is not None:
            self._dead_letter(
                pending, f"{reason} (gave up after {pending.attempts} delivery attempts)"
            )
            return
        # Without a DLQ a record is never dropped: it keeps coming back at the max backoff.
        self.backlog.retry(pending, now + (delay or self._backoff(pending.attempts)))

    def _dead_letter(self, pending: Pending, reason: str) -> None:
        assert self.dead_letters is not None
        self._inflight[pending.tp] = self._inflight.get(pending.tp, 0) + 1
        self.dead_letters.put_nowait(DeadLetter(pending, reason))

    def dead_lettered(self, pending: Pending) -> None:
        """The broker confirmed the DLQ write: now, and only now, the record is settled."""
        if pending.tp in self.assigned or pending.tp in self.revoking:
            self._release(pending.tp)
            self.ledger.settle(pending.tp, pending.offset)
        self._wake.set()

    def _backoff(self, attempts: int) -> float:
        """Exponential, capped, with jitter so a burst of nacks doesn't return as a burst."""
        retry = self.config.retry
        ceiling = min(
            retry.initial_backoff_ms * retry.multiplier ** min(max(attempts - 1, 0), 64),
            retry.max_backoff_ms,
        )
        return (ceiling / 2 + random.uniform(0, ceiling / 2)) / 1000

    # -- bookkeeping -----------------------------------------------------------------------

    def _find(self, stream: Stream, ref: pb.RecordRef) -> tuple[_Batch, Pending] | int:
        key = (ref.topic, ref.partition, ref.offset)
        batch_id = stream.index.get(key)
        if batch_id is not None:
            batch = stream.batches[batch_id]
            return batch, batch.records[key]
        tp = (ref.topic, ref.partition)
        if tp in self.revoked:
            return pb.REJECT_REASON_REVOKED
        partition = self.ledger.partition(tp)
        if partition is not None and partition.is_settled(ref.offset):
            return pb.REJECT_REASON_ALREADY_SETTLED
        return pb.REJECT_REASON_UNKNOWN

    def _why_no_batch(self, stream: Stream, batch_id: int) -> int:
        if batch_id in stream.closed_batches:
            return stream.closed_batches[batch_id]
        if 0 < batch_id < stream.next_batch_id:
            return pb.REJECT_REASON_ALREADY_SETTLED
        return pb.REJECT_REASON_UNKNOWN

    def _settle(self, stream: Stream, batch: _Batch, pending: Pending) -> None:
        self.stats.acked += 1
        self._take_back(stream, batch, pending, "ack")
        outcome = self.ledger.settle(pending.tp, pending.offset)
        if outcome is not SettleOutcome.SETTLED:  # pragma: no cover - a bookkeeping bug
            log.error(
                "settled a record the ledger did not expect",
                extra={"topic": pending.tp[0], "partition": pending.tp[1], "outcome": outcome},
            )

    def _settle_batch(self, stream: Stream, batch: _Batch) -> None:
        """Every unsettled record of a batch, in one pass: the common ack, kept lean."""
        counts: dict[TopicPartition, int] = {}
        size = 0
        index, settle, tracing = stream.index, self.ledger.settle, self.tracing
        for key, pending in batch.records.items():
            del index[key]
            tp = pending.tp
            counts[tp] = counts.get(tp, 0) + 1
            size += pending.size
            if tracing is not None:
                tracing.ended(pending, "ack")
            settle(tp, pending.offset)
        settled = len(batch.records)
        stream.out_records -= settled
        stream.out_bytes -= size
        for tp, count in counts.items():
            self._release(tp, count)
        del stream.batches[batch.id]
        self.stats.acked += settled

    def _take_back(self, stream: Stream, batch: _Batch, pending: Pending, outcome: str) -> None:
        """Removes a record from what the stream holds (settled, or to be redelivered)."""
        self._end_span(pending, outcome)
        key = (pending.tp[0], pending.tp[1], pending.offset)
        del batch.records[key]
        del stream.index[key]
        stream.out_records -= 1
        stream.out_bytes -= pending.size
        self._release(pending.tp)
        if not batch.records:
            del stream.batches[batch.id]

    def _end_span(self, pending: Pending, outcome: str) -> None:
        if self.tracing is not None:
            self.tracing.ended(pending, outcome)

    def _close_batch(self, stream: Stream, batch: _Batch, reason: int) -> None:
        stream.batches.pop(batch.id, None)
        stream.closed_batches[batch.id] = reason
        if len(stream.closed_batches) > _CLOSED_BATCH_MEMORY:
            del stream.closed_batches[next(iter(stream.closed_batches))]

    def _release(self, tp: TopicPartition, count: int = 1) -> None:
        left = self._inflight.get(tp, 0) - count
        if left > 0:
            self._inflight[tp] = left
        else:
            self._inflight.pop(tp, None)

    def _broadcast(self, message: pb.ConsumeResponse) -> None:
        for stream in self.streams.values():
            stream.send(message)

    # -- the loop --------------------------------------------------------------------------

    def close(self, deadline_ms: int) -> None:
        """Shutdown: no more batches; every stream is told how long it has to settle."""
        self._closing = True
        self._broadcast(pb.ConsumeResponse(draining=pb.Draining(deadline_ms=deadline_ms)))
        self._wake.set()

    def end_streams(self) -> None:
        for stream in self.streams.values():
            stream.outbox.put_nowait(None)

    @property
    def unsettled(self) -> int:
        """Records out with the app or on their way to the DLQ: what shutdown waits for."""
        return sum(self._inflight.values())

    @property
    def in_flight(self) -> tuple[int, int, int]:
        """(batches, records, bytes) out with the app, over all streams."""
        batches = records = size = 0
        for stream in self.streams.values():
            batches += len(stream.batches)
            records += stream.out_records
            size += stream.out_bytes
        return batches, records, size

    async def run(self) -> None:
        """Sends batches whenever a stream has room and the batching policy says go."""
        while True:
            self._wake.clear()
            wake_at = None if self._closing else self._dispatch(time.monotonic())
            if wake_at is None:
                await self._wake.wait()
                continue
            timeout = wake_at - time.monotonic()
            if timeout > 0:
                try:
                    async with asyncio.timeout(timeout):
                        await self._wake.wait()
                except TimeoutError:
                    pass

    def _dispatch(self, now: float) -> float | None:
        """Sends what can go now; returns when to look again (linger, backoff, deadline)."""
        self._expire(now)
        self.backlog.release_due(now)
        wake_at: float | None = None
        streams = sorted(self.streams.values(), key=lambda s: s.out_records)
        for stream in streams:
            while (room := stream.room()) is not None:
                max_records = min(room[0], self.config.batch.max_records)
                max_bytes = min(room[1], self.config.batch.max_bytes)
                # Under partition ordering a partition waits while any of its records is out
                # with the app or on its way to the DLQ; revoking partitions get nothing new.
                busy = set(self._inflight) | self.revoking
                ready_at = self.backlog.ready_at(busy, max_records, max_bytes, now)
                if ready_at is None:
                    break
                if ready_at > now:
                    wake_at = ready_at if wake_at is None else min(wake_at, ready_at)
                    break
                self._send_batch(stream, self.backlog.take(busy, max_records, max_bytes), now)
        for candidate in (self.backlog.next_due(), self._next_deadline()):
            if candidate is not None:
                wake_at = candidate if wake_at is None else min(wake_at, candidate)
        return wake_at

    def _send_batch(self, stream: Stream, records: list[Pending], now: float) -> None:
        batch = _Batch(
            id=stream.next_batch_id,
            deadline=now + self.config.ack_deadline_ms / 1000,
            records={},
        )
        stream.next_batch_id += 1
        wire = pb.Batch(batch_id=batch.id)
        redelivered = size = 0
        counts: dict[TopicPartition, int] = {}
        tracing = self.tracing
        index = stream.index
        for pending in records:
            if pending.attempts:
                redelivered += 1
            pending.attempts += 1
            _add_record(wire, pending)
            if tracing is not None:
                tracing.delivered(pending, self.group_id)
            tp = pending.tp
            key = (tp[0], tp[1], pending.offset)
            batch.records[key] = pending
            index[key] = batch.id
            size += pending.size
            counts[tp] = counts.get(tp, 0) + 1
        for tp, count in counts.items():
            self._inflight[tp] = self._inflight.get(tp, 0) + count
        stream.out_records += len(records)
        stream.out_bytes += size
        stream.batches[batch.id] = batch
        self.stats.delivered += len(records)
        self.stats.redelivered += redelivered
        self.drained.set()
        stream.send(pb.ConsumeResponse(batch=wire))

    def _next_deadline(self) -> float | None:
        deadlines = [b.deadline for s in self.streams.values() for b in s.batches.values()]
        return min(deadlines) if deadlines else None

    def _expire(self, now: float) -> None:
        """Records unsettled past the ack deadline are redelivered as if nacked."""
        for stream in self.streams.values():
            for batch in [b for b in stream.batches.values() if b.deadline <= now]:
                log.warning(
                    "ack deadline passed; redelivering",
                    extra={
                        "subscription": self.config.name,
                        "stream": stream.id,
                        "batch_id": batch.id,
                        "records": len(batch.records),
                    },
                )
                self.stats.deadline_expired += len(batch.records)
                for pending in list(batch.records.values()):
                    self._take_back(stream, batch, pending, "deadline")
                    self._retry(pending, now, 0, "ack deadline passed")
                self._close_batch(stream, batch, pb.REJECT_REASON_EXPIRED)


_REJECT_MESSAGES: dict[int, str] = {
    pb.REJECT_REASON_UNKNOWN: "no such batch or record is held by this stream",
    pb.REJECT_REASON_ALREADY_SETTLED: "already settled",
    pb.REJECT_REASON_REVOKED: "partition revoked: the record goes to its next owner",
    pb.REJECT_REASON_INVALID: "invalid request",
    pb.REJECT_REASON_EXPIRED: "its ack deadline passed; it was redelivered",
}


class _Rejections:
    """Collects refused refs of one ack/nack, grouped by reason, for `rejected` replies."""

    def __init__(self) -> None:
        self._by_reason: dict[int, pb.Rejected] = {}

    def _for(self, reason: int) -> pb.Rejected:
        rejected = self._by_reason.get(reason)
        if rejected is None:
            rejected = self._by_reason[reason] = pb.Rejected(reason=reason)  # type: ignore[arg-type]
        return rejected

    def batch(self, batch_id: int, reason: int) -> None:
        self._for(reason).batch_ids.append(batch_id)

    def record(self, ref: pb.RecordRef, reason: int) -> None:
        self._for(reason).records.append(ref)

    def send(self, stream: Stream, message: str | None = None) -> int:
        """Sends one `rejected` per reason; returns how many refs were refused."""
        refused = 0
        for reason, rejected in self._by_reason.items():
            rejected.message = message or _REJECT_MESSAGES[reason]
            stream.send(pb.ConsumeResponse(rejected=rejected))
            refused += len(rejected.batch_ids) + len(rejected.records)
        return refused


def _tps(tps: Iterable[TopicPartition]) -> list[pb.TopicPartition]:
    return [pb.TopicPartition(topic=t, partition=p) for t, p in sorted(tps)]
