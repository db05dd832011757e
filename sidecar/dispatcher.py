"""The asyncio shell around a subscription's settlement state machine (`inflight.py`).

Fetched records go in, batches go out to the app's streams as protobuf, acks and nacks come
back in as domain calls and their refused parts go out as `rejected`. Everything here runs on
the event loop without awaiting, so no locks: a stream's outbox is an unbounded queue whose
size the window bounds. The rules themselves live in the state machine, which is pure.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from kafkasidecar.v1 import consumer_pb2 as pb
from sidecar import __version__, wire
from sidecar.batcher import TopicPartition
from sidecar.config import SubscriptionConfig
from sidecar.deadletters import DeadLetter
from sidecar.inflight import Batch, Fetched, InFlight, Policy, Refused, Staged, Stats, Window
from sidecar.ledger import Ledger
from sidecar.tracing import Tracing

log = logging.getLogger("sidecar.dispatcher")


@dataclass(eq=False)
class Stream:
    """One app stream: its outbox and its window in the state machine."""

    id: str
    client_id: str
    window: Window
    #: Messages, or the bytes of one (batches are built as bytes: see `wire.batch`).
    outbox: asyncio.Queue[pb.ConsumeResponse | bytes | None] = field(default_factory=asyncio.Queue)

    def send(self, message: pb.ConsumeResponse | bytes) -> None:
        self.outbox.put_nowait(message)


class Dispatcher:
    """Fetched records → batches → streams, and acks/nacks → the state machine, for one
    subscription (or one snapshot stream)."""

    def __init__(
        self,
        config: SubscriptionConfig,
        ledger: Ledger,
        *,
        group_id: str = "",
        dead_letters: Callable[[DeadLetter], None] | None = None,
        stats: Stats | None = None,
        tracing: Tracing | None = None,
        stream_ids: Iterator[int] | None = None,
    ) -> None:
        self.config = config
        self.group_id = group_id
        #: Hands a record the app gave up on to the dead-letter writer.
        self._dead_letters = dead_letters
        self.tracing = tracing
        self.flight = InFlight(
            Policy.of(config),
            ledger,
            stats=stats,
            on_end=tracing.ended if tracing is not None else None,
        )
        self.streams: dict[str, Stream] = {}
        #: Set whenever a stream attaches or detaches (the group membership follows streams).
        self.streams_changed = asyncio.Event()
        #: Set whenever batches went out: the backlog has room again (resume fetching).
        self.drained = asyncio.Event()
        #: Shared by a snapshot subscription's per-stream dispatchers: stream ids stay unique.
        self._stream_ids = stream_ids or itertools.count(1)
        self._wake = asyncio.Event()
        self._closing = False
        #: Writes an ack's outputs (outputs.py), which report back through `outputs_*`;
        #: None where acks cannot carry outputs (snapshots).
        self.outputs: Callable[[Staged], None] | None = None

    @property
    def ledger(self) -> Ledger:
        return self.flight.ledger

    @property
    def stats(self) -> Stats:
        return self.flight.stats

    @property
    def assigned(self) -> set[TopicPartition]:
        return self.flight.assigned

    # -- streams ---------------------------------------------------------------------------

    def attach(self, request: pb.Open, peer: str) -> Stream:
        window = self.config.window

        def limit(asked: int, cap: int) -> int:
            return min(asked, cap) if asked > 0 else cap

        stream = Stream(
            id=f"{self.config.name}-{next(self._stream_ids)}",
            client_id=request.client_id or peer,
            window=Window(
                "",
                max_batches=limit(request.max_outstanding_batches, window.max_outstanding_batches),
                max_records=limit(request.max_outstanding_records, window.max_outstanding_records),
                max_bytes=limit(request.max_outstanding_bytes, window.max_outstanding_bytes),
            ),
        )
        stream.window.id = stream.id
        stream.send(
            pb.ConsumeResponse(
                opened=pb.Opened(
                    subscription=self.config.name,
                    group_id=self.group_id,
                    mode=wire.MODES[self.config.mode],
                    ordering=wire.ORDERINGS[self.config.ordering],
                    max_outstanding_batches=stream.window.max_batches,
                    max_outstanding_records=stream.window.max_records,
                    max_outstanding_bytes=stream.window.max_bytes,
                    batch_max_records=self.config.batch.max_records,
                    batch_max_bytes=self.config.batch.max_bytes,
                    batch_max_wait_ms=self.config.batch.max_wait_ms,
                    ack_deadline_ms=self.config.ack_deadline_ms,
                    version=__version__,
                    stream_id=stream.id,
                    transactional=self.config.transactions.enabled,
                )
            )
        )
        if assigned := self.flight.assigned:
            stream.send(wire.assigned(assigned))
        self.streams[stream.id] = stream
        self.flight.attach(stream.window)
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
        returned = self.flight.detach(stream.window, time.monotonic())
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
        stream.window.draining = True

    # -- from the consumer -----------------------------------------------------------------

    def add(self, tp: TopicPartition, fetch: Fetched) -> None:
        """The records one fetch brought for one partition, in offset order."""
        if self.flight.add(tp, fetch, time.monotonic()):
            log.warning(
                "partition repositioned below what was fetched (e.g. auto_offset_reset after "
                "the log was truncated); what was in flight there is void and it starts over",
                extra={
                    "subscription": self.config.name,
                    "topic": tp[0],
                    "partition": tp[1],
                    "offset": fetch.offsets[0],
                },
            )
        self._wake.set()

    def skip(self, tp: TopicPartition, ranges: list[tuple[int, int]]) -> None:
        """Offsets of `tp` already settled (by an earlier owner): settle them when fetched."""
        self.flight.skip(tp, ranges)
        log.info(
            "skipping records settled before the last commit",
            extra={
                "subscription": self.config.name,
                "topic": tp[0],
                "partition": tp[1],
                "records": sum(end - start for start, end in ranges),
            },
        )

    def assign(self, tps: Iterable[TopicPartition]) -> None:
        if new := self.flight.assign(tps):
            self._broadcast(wire.assigned(new))

    def begin_revoke(self, tps: Iterable[TopicPartition]) -> None:
        """Stops delivering these partitions; what the app holds may still be settled."""
        self.flight.begin_revoke(tps)

    def unsettled_in(self, tps: Iterable[TopicPartition]) -> int:
        """Records of these partitions out with the app or on their way to the DLQ."""
        return self.flight.unsettled_in(tps)

    def revoke(self, tps: Iterable[TopicPartition]) -> None:
        """Drops the partitions' records, buffered and in flight; the next owner gets them."""
        if gone := self.flight.revoke(tps):
            self._broadcast(wire.revoked(gone))
        self._wake.set()

    def reset(self, tps: Iterable[TopicPartition]) -> None:
        """The partitions' offsets were reset: what was fetched or in flight is void."""
        self.flight.reset(tps)
        self._wake.set()

    def backpressure(self, tp: TopicPartition, paused: bool) -> bool:
        return self.flight.backpressure(tp, paused)

    # -- from the app ----------------------------------------------------------------------

    def ack(self, stream: Stream, request: pb.Ack) -> None:
        refs = wire.refs(request.records)
        outputs = request.outputs or None
        if outputs is None:
            refused = self.flight.ack(stream.window, request.batch_ids, refs)
        elif (problem := self._bad_outputs(outputs)) is not None:
            refused = self.flight.invalid(request.batch_ids, refs)
            refused.message = problem
        else:
            refused = self.flight.ack(stream.window, request.batch_ids, refs, outputs)
            write = self.outputs
            assert write is not None  # _bad_outputs said so
            for staged in self.flight.take_staged():
                write(staged)
        self._reject(stream, refused)
        self._wake.set()

    def _bad_outputs(self, outputs: Sequence[pb.OutputRecord]) -> str | None:
        if self.outputs is None:
            return f"subscription {self.config.name!r} does not write outputs (mode snapshot)"
        for index, output in enumerate(outputs):
            if not output.topic:
                return f"outputs[{index}] has no topic"
        return None

    def outputs_written(self, staged: Staged) -> None:
        """An ack's outputs are written (committed, with transactions): its records are
        settled now."""
        self.flight.written(staged)
        self._wake.set()

    def outputs_failed(self, staged: Staged, reason: str) -> None:
        """An ack's outputs could not be written: its records go out again, as if nacked."""
        self.flight.failed(staged, reason, time.monotonic())
        self._flush_letters()
        self._wake.set()

    def outputs_released(self, staged: Staged) -> None:
        """An ack's outputs were not written through no fault of theirs: its records go out
        again at once."""
        self.flight.released(staged, time.monotonic())
        self._wake.set()

    def fenced(self, tp: TopicPartition) -> None:
        """The partition's transactional producer was fenced: no more deliveries from it
        until the group hands it out again."""
        self.flight.begin_revoke([tp])
        self._wake.set()

    def nack(self, stream: Stream, request: pb.Nack) -> None:
        refs = wire.refs(request.records)
        if request.action not in wire.NACK_ACTIONS:
            refused = self.flight.invalid(request.batch_ids, refs)
            refused.message = f"unknown nack action {request.action}"
        else:
            refused = self.flight.nack(
                stream.window,
                request.batch_ids,
                refs,
                dead_letter=request.action == pb.NACK_ACTION_DEAD_LETTER,
                reason=request.reason,
                retry_after_s=request.retry_after_ms / 1000,
                now=time.monotonic(),
            )
        self._reject(stream, refused)
        self._flush_letters()
        self._wake.set()

    def dead_lettered(self, letter: DeadLetter) -> None:
        """The broker confirmed the DLQ write: now, and only now, the record is settled."""
        if not self.flight.dead_lettered(letter.pending):
            log.info(
                "dead-letter write confirmed for a partition no longer held in that "
                "assignment; its next owner delivers the record again",
                extra={
                    "subscription": self.config.name,
                    "topic": letter.pending.tp[0],
                    "partition": letter.pending.tp[1],
                    "offset": letter.pending.offset,
                },
            )
        self._wake.set()

    def _flush_letters(self) -> None:
        letters = self.flight.take_letters()
        if letters:
            assert self._dead_letters is not None, "dead letters without a dead_letter topic"
            for pending, reason in letters:
                self._dead_letters(DeadLetter(pending, reason, wire.message(pending)))

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
        return self.flight.unsettled

    @property
    def in_flight(self) -> tuple[int, int, int]:
        """(batches, records, bytes) out with the app, over all streams."""
        return self.flight.in_flight

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
        dispatch = self.flight.poll(now)
        for expired in dispatch.expired:
            log.warning(
                "ack deadline passed; redelivering",
                extra={
                    "subscription": self.config.name,
                    "stream": expired.window.id,
                    "batch_id": expired.batch_id,
                    "records": expired.records,
                },
            )
        for batch in dispatch.batches:
            self._send(batch)
        if dispatch.batches:
            self.drained.set()
        self._flush_letters()
        return dispatch.wake_at

    def _send(self, batch: Batch) -> None:
        if self.tracing is not None:
            for pending in batch.records:
                self.tracing.delivered(pending, self.group_id)
        self.streams[batch.window.id].send(wire.batch(batch))

    def _reject(self, stream: Stream, refused: Refused) -> None:
        for message in wire.rejections(refused):
            stream.send(message)

    def _broadcast(self, message: pb.ConsumeResponse) -> None:
        for stream in self.streams.values():
            stream.send(message)
