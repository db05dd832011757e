"""An asyncio client for kafka-sidecar: ``async for`` over batches, then ack or nack them.

The sidecar beside your app owns Kafka (group membership, MSK IAM auth, retries, dead
letters, commits); the app only says what it has finished. Only acks move committed offsets,
so anything not acked is redelivered: after a crash, a cancel, or a sidecar restart.

A complete consumer::

    import asyncio
    import logging

    from kafkasidecar import PartitionsRevoked, SidecarConsumer, StreamLostError


    async def handle(value: bytes | None) -> None:
        print(value)


    def revoked(event: PartitionsRevoked) -> None:
        # The partitions went to another member; acks for their records are rejected now.
        logging.info("revoked %s", event.partitions)


    async def main() -> None:
        async with SidecarConsumer(
            "unix:///var/run/kafka-sidecar/sidecar.sock",  # or "127.0.0.1:50051"
            "receipts",  # a subscription name from the sidecar's config
            max_outstanding_batches=2,  # the flow-control window of this worker
            on_revoked=revoked,
        ) as consumer:
            async for batch in consumer:
                try:
                    for record in batch:
                        if record.value is None:  # a tombstone
                            await record.ack()
                            continue
                        try:
                            await handle(record.value)
                        except ValueError as exc:  # will never succeed: park it in the DLQ
                            await record.nack(dead_letter=True, reason=str(exc))
                        except Exception:  # may succeed later: redeliver after backoff
                            await record.nack(retry_after_ms=5000)
                    await batch.ack()  # settles every record not settled above
                except StreamLostError:
                    # The sidecar restarted under us: it redelivers this batch on the new
                    # stream, which the consumer has already opened.
                    continue


    asyncio.run(main())

Leaving the ``async with`` block (normally, by an exception, or because the task was
cancelled) drains the stream: the sidecar is told to send nothing more, the stream ends, and
every record not yet settled goes back to the sidecar for redelivery. Nothing is lost.

What surfaces and how:

- Batches: ``async for``. ``batch.records`` are :class:`Record` objects (``batch.pb`` is the
  wire message); settle a whole batch, single records, or a mix (``consumer.ack(...)``).
  Settling twice is harmless: the first settlement wins and later ones send nothing.
- Rebalances, rejected acks, sidecar shutdown, (re)connects: typed events
  (:class:`PartitionsAssigned`, :class:`PartitionsRevoked`, :class:`Rejected`,
  :class:`Draining`, :class:`CaughtUp`, :class:`Connected`, :class:`Disconnected`), delivered
  to the ``on_*`` callbacks and to every ``consumer.events()`` iterator. An event nobody
  listens to is logged, a :class:`Rejected` one as a warning, so none passes unseen.
- Sidecar restarts: the consumer reopens its stream with exponential backoff and goes on.
  A batch from the old stream cannot be settled any more (the sidecar already took its
  records back): its ``ack``/``nack`` raise :class:`StreamLostError`.
- Fatal stream errors (unknown subscription, wrong token, ...) end the ``async for`` with
  :class:`StreamError`; giving up on an unreachable sidecar raises
  :class:`SidecarUnavailableError`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import logging
import os
import random
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Generic, NamedTuple, TypeVar

import grpc

from kafkasidecar.v1 import consumer_pb2 as pb
from kafkasidecar.v1 import consumer_pb2_grpc as pb_grpc

__all__ = [
    "Batch",
    "CaughtUp",
    "Connected",
    "Disconnected",
    "Draining",
    "Event",
    "EventStream",
    "PartitionsAssigned",
    "PartitionsRevoked",
    "Record",
    "RecordRef",
    "RejectReason",
    "Rejected",
    "SidecarConsumer",
    "SidecarError",
    "SidecarUnavailableError",
    "StreamError",
    "StreamLostError",
    "TopicPartition",
]

log = logging.getLogger("kafkasidecar.client")

#: Status codes that mean "this request is wrong", not "the sidecar is away": reconnecting
#: would only repeat them, so they end the consumer.
FATAL_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.FAILED_PRECONDITION,
    }
)
#: Events that arrive while no `events()` iterator exists are kept (up to this many) for the
#: first one, so an iterator started right after `async with` still sees the first assignment.
UNCLAIMED_EVENTS = 1000


# ---- errors ----------------------------------------------------------------------------------


class SidecarError(Exception):
    """Base of this client's errors."""


class StreamLostError(SidecarError):
    """The stream that delivered a batch has ended, so its records can no longer be settled.

    Nothing is lost: the sidecar took the records back when the stream ended and redelivers
    them (``delivery_attempt`` + 1), usually on the consumer's next stream.
    """


class StreamError(SidecarError):
    """The sidecar refused the stream for good (e.g. unknown subscription, wrong token)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class SidecarUnavailableError(SidecarError):
    """No stream could be opened (and reconnecting is off, or `reconnect_timeout` passed)."""


# ---- values ----------------------------------------------------------------------------------


class TopicPartition(NamedTuple):
    topic: str
    partition: int


class RecordRef(NamedTuple):
    """A record's coordinates: what acks, nacks and rejections name."""

    topic: str
    partition: int
    offset: int


class RejectReason(enum.IntEnum):
    """Why the sidecar refused (part of) an ack or nack; mirrors ``RejectReason`` in the API."""

    UNSPECIFIED = pb.REJECT_REASON_UNSPECIFIED
    #: No such batch or record on this stream.
    UNKNOWN = pb.REJECT_REASON_UNKNOWN
    #: Already acked or dead-lettered.
    ALREADY_SETTLED = pb.REJECT_REASON_ALREADY_SETTLED
    #: Its partition was revoked; the record goes to the partition's next owner.
    REVOKED = pb.REJECT_REASON_REVOKED
    #: Malformed, or not supported by this sidecar (e.g. no dead-letter topic configured).
    INVALID = pb.REJECT_REASON_INVALID
    #: Its ack deadline passed: it was taken back and redelivered.
    EXPIRED = pb.REJECT_REASON_EXPIRED

    @classmethod
    def of(cls, value: int) -> RejectReason:
        try:
            return cls(value)
        except ValueError:
            return cls.UNSPECIFIED


# ---- events ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Connected:
    """A stream is open: the first one, or a new one after the sidecar came back."""

    opened: pb.Opened
    reconnected: bool


@dataclass(frozen=True, slots=True)
class Disconnected:
    """The stream ended unexpectedly; records held from it will be redelivered.

    ``retry_in`` is the delay before the next attempt (None: the consumer gives up).
    """

    error: BaseException | None
    retry_in: float | None


@dataclass(frozen=True, slots=True)
class PartitionsAssigned:
    partitions: tuple[TopicPartition, ...]


@dataclass(frozen=True, slots=True)
class PartitionsRevoked:
    """These partitions left this sidecar: acks for their records come back as `Rejected`."""

    partitions: tuple[TopicPartition, ...]


@dataclass(frozen=True, slots=True)
class CaughtUp:
    """Snapshot subscriptions: every partition reached the end offsets seen at (re)start."""

    end_offsets: dict[TopicPartition, int]


@dataclass(frozen=True, slots=True)
class Rejected:
    """Some refs of an ack or nack could not be applied; the stream stays open."""

    batch_ids: tuple[int, ...]
    records: tuple[RecordRef, ...]
    reason: RejectReason
    message: str


@dataclass(frozen=True, slots=True)
class Draining:
    """The sidecar is shutting down: no more batches; settle what you hold within the deadline.

    The stream then ends and the consumer reconnects (to the restarted sidecar) on its own.
    """

    deadline_ms: int


Event = (
    Connected
    | Disconnected
    | PartitionsAssigned
    | PartitionsRevoked
    | CaughtUp
    | Rejected
    | Draining
)
E = TypeVar("E")
#: A callback: plain or async. Async ones are awaited before the next message is read.
Callback = Callable[[E], Awaitable[None] | None]


# ---- records and batches -----------------------------------------------------------------------


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
                nack=_nack_pb([], [_ref_pb(self)], retry_after_ms, reason, dead_letter)
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

    def __init__(self, conn: _Connection, batch: pb.Batch) -> None:
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

        Raises StreamLostError when the batch's stream has ended (see the module docs).
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
            pb.ConsumeRequest(nack=_nack_pb([self.id], [], retry_after_ms, reason, dead_letter)),
            self,
        )

    def __repr__(self) -> str:
        return f"Batch(id={self.id}, records={len(self.records)}, stream={self.stream_id!r})"


def _ref_pb(record: Record) -> pb.RecordRef:
    return pb.RecordRef(
        topic=record.pb.topic, partition=record.pb.partition, offset=record.pb.offset
    )


def _nack_pb(
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


# ---- one stream --------------------------------------------------------------------------------


class _Connection:
    """One channel and one Consume call: opened, read by the consumer's task, then gone.

    Requests go through a queue that the call's request iterator drains, so a caller that is
    cancelled mid-ack never cancels the RPC; each caller's future resolves once gRPC has
    taken its message, or fails when the stream ends first.
    """

    def __init__(self, consumer: SidecarConsumer, open_request: pb.ConsumeRequest) -> None:
        self.target = consumer.target
        if consumer._credentials is not None:
            self.channel = grpc.aio.secure_channel(
                consumer.target, consumer._credentials, options=consumer._channel_options
            )
        else:
            self.channel = grpc.aio.insecure_channel(
                consumer.target, options=consumer._channel_options
            )
        self._outbox: asyncio.Queue[tuple[pb.ConsumeRequest, asyncio.Future[None] | None] | None]
        self._outbox = asyncio.Queue()
        self._outbox.put_nowait((open_request, None))
        self._pending: set[asyncio.Future[None]] = set()
        self._writing = True
        self.lost: str | None = None
        self.stream_id = ""
        self.call: Any = pb_grpc.ConsumerServiceStub(self.channel).Consume(
            self._requests(), metadata=consumer._metadata
        )

    @property
    def alive(self) -> bool:
        return self.lost is None and self._writing

    async def _requests(self) -> AsyncIterator[pb.ConsumeRequest]:
        while (item := await self._outbox.get()) is not None:
            request, taken = item
            yield request
            # Resumed only after gRPC wrote the request: now the caller may go on.
            if taken is not None and not taken.done():
                taken.set_result(None)

    async def send(self, request: pb.ConsumeRequest, batch: Batch | None = None) -> None:
        """Queues a request and waits until gRPC has taken it; StreamLostError if it cannot."""
        if not self.alive:
            raise self._lost_error(batch)
        taken: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.add(taken)
        taken.add_done_callback(self._pending.discard)
        self._outbox.put_nowait((request, taken))
        await taken

    def end_writing(self) -> None:
        """Half-closes the stream: the sidecar detaches it and takes back what it held."""
        if self._writing:
            self._writing = False
            self._outbox.put_nowait(None)

    def mark_lost(self, why: str) -> None:
        self.lost = why
        self._writing = False
        for taken in list(self._pending):
            if not taken.done():
                taken.set_exception(self._lost_error(None))

    def _lost_error(self, batch: Batch | None) -> StreamLostError:
        what = f"batch {batch.id}" if batch is not None else "request"
        why = self.lost or "the consumer closed it"
        return StreamLostError(
            f"cannot settle {what}: stream {self.stream_id or '(unopened)'} to {self.target} "
            f"has ended ({why}); the sidecar redelivers its unsettled records"
        )

    async def close(self) -> None:
        self.call.cancel()
        await self.channel.close()


# ---- the consumer ------------------------------------------------------------------------------


@dataclass
class _Listeners:
    on_assigned: Callback[PartitionsAssigned] | None = None
    on_revoked: Callback[PartitionsRevoked] | None = None
    on_rejected: Callback[Rejected] | None = None
    on_draining: Callback[Draining] | None = None
    on_event: Callback[Event] | None = None
    queues: list[asyncio.Queue[Event | None]] = field(default_factory=list)

    def specific(self, event: Event) -> Callback[Any] | None:
        if isinstance(event, PartitionsAssigned):
            return self.on_assigned
        if isinstance(event, PartitionsRevoked):
            return self.on_revoked
        if isinstance(event, Rejected):
            return self.on_rejected
        if isinstance(event, Draining):
            return self.on_draining
        return None


_T = TypeVar("_T")


class EventStream(Generic[_T]):
    """What `consumer.events()` returns: an async iterator of events, ended by the consumer's close.

    It is registered when created, not when first iterated, so no event slips in between.
    `aclose()` it to stop receiving.
    """

    def __init__(self, queue: asyncio.Queue[_T | None], unregister: Callable[[], None]) -> None:
        self._queue = queue
        self._unregister = unregister
        self._done = False

    def __aiter__(self) -> EventStream[_T]:
        return self

    async def __anext__(self) -> _T:
        if self._done:
            raise StopAsyncIteration
        item = await self._queue.get()
        if item is None:
            await self.aclose()
            raise StopAsyncIteration
        return item

    async def aclose(self) -> None:
        if not self._done:
            self._done = True
            self._unregister()


_WAKE = object()


class SidecarConsumer:
    """Consumes one subscription of a kafka-sidecar over one stream, reopened when it breaks.

    `target` is a gRPC target: ``unix:///path/to/sidecar.sock`` or ``host:port``.
    `subscription` names a subscription in the sidecar's config. The ``max_outstanding_*``
    limits are this worker's flow-control window (0 = the subscription's default; the sidecar
    caps them at its own limits). `token` is sent as ``authorization: Bearer <token>``.

    With `reconnect` (the default) an unavailable or restarting sidecar is retried with
    exponential backoff from `initial_backoff` up to `max_backoff` seconds, with jitter, for
    as long as it takes, or until `reconnect_timeout` seconds pass without a stream. That
    includes the first connect: an app may start before its sidecar does.

    `close_timeout` bounds how long closing waits for the sidecar to confirm the stream's end.
    """

    def __init__(
        self,
        target: str,
        subscription: str,
        *,
        client_id: str | None = None,
        max_outstanding_batches: int = 0,
        max_outstanding_records: int = 0,
        max_outstanding_bytes: int = 0,
        token: str | None = None,
        reconnect: bool = True,
        initial_backoff: float = 0.2,
        max_backoff: float = 5.0,
        reconnect_timeout: float | None = None,
        close_timeout: float = 10.0,
        credentials: grpc.ChannelCredentials | None = None,
        channel_options: Sequence[tuple[str, Any]] = (),
        on_assigned: Callback[PartitionsAssigned] | None = None,
        on_revoked: Callback[PartitionsRevoked] | None = None,
        on_rejected: Callback[Rejected] | None = None,
        on_draining: Callback[Draining] | None = None,
        on_event: Callback[Event] | None = None,
    ) -> None:
        self.target = target
        self.subscription = subscription
        self.client_id = client_id or f"{socket.gethostname()}-{os.getpid()}"
        self._open = pb.Open(
            subscription=subscription,
            client_id=self.client_id,
            max_outstanding_batches=max_outstanding_batches,
            max_outstanding_records=max_outstanding_records,
            max_outstanding_bytes=max_outstanding_bytes,
        )
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self._reconnect = reconnect
        self._initial_backoff = initial_backoff
        self._max_backoff = max_backoff
        self._reconnect_timeout = reconnect_timeout
        self._close_timeout = close_timeout
        self._credentials = credentials
        self._channel_options = list(channel_options)
        self._listeners = _Listeners(on_assigned, on_revoked, on_rejected, on_draining, on_event)
        self._unclaimed: collections.deque[Event] = collections.deque(maxlen=UNCLAIMED_EVENTS)
        self._batches: asyncio.Queue[Batch | object] = asyncio.Queue()
        self._conn: _Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._closing = asyncio.Event()
        self._interrupt = asyncio.Event()  # wakes the supervisor from its backoff sleep
        self._stopped = False  # no more batches for the iterator (drain, close, failure)
        self._closed = False
        self._error: BaseException | None = None
        self._assignment: set[TopicPartition] = set()
        #: The settings in force on the current stream (None before the first one opens).
        self.opened: pb.Opened | None = None

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Opens the first stream; raises StreamError / SidecarUnavailableError if it cannot."""
        if self._task is not None:
            raise RuntimeError("SidecarConsumer was already started")
        self._task = asyncio.create_task(self._run(), name=f"kafkasidecar:{self.target}")
        connected = asyncio.create_task(self._connected.wait())
        try:
            await asyncio.wait({connected, self._task}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            await self.aclose()
            raise
        finally:
            connected.cancel()
        if not self._connected.is_set():
            await self.aclose()
            raise self._error or SidecarUnavailableError(
                f"closed before a stream to {self.target} opened"
            )

    async def __aenter__(self) -> SidecarConsumer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def drain(self) -> None:
        """Stops the batches: tells the sidecar to send no more and ends `async for`.

        The stream stays open, so batches already handed out can still be settled; then call
        `aclose()`. Also stops reconnecting: a new stream would only bring new batches.
        """
        if self._stopped:
            return
        self._stop()
        conn = self._conn
        if conn is not None and conn.alive:
            with contextlib.suppress(StreamLostError, TimeoutError):
                async with asyncio.timeout(self._close_timeout):
                    await conn.send(pb.ConsumeRequest(drain=pb.Drain()))

    async def aclose(self) -> None:
        """Drains and ends the stream; what is not settled by now is redelivered. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            await self.drain()
        finally:
            self._closing.set()
            self._interrupt.set()
            conn = self._conn
            task = self._task
            if conn is not None:
                conn.end_writing()
            if task is not None and not task.done() and task is not asyncio.current_task():
                # With a live stream the task ends once the sidecar closes its side; otherwise
                # (connecting, backing off) it ends at once.
                try:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self._close_timeout if conn else 0):
                            await asyncio.shield(task)
                finally:
                    if not task.done():
                        task.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await task
            self._end_events()

    @property
    def connected(self) -> bool:
        """Whether a stream is open right now."""
        return self._conn is not None and self._conn.alive

    @property
    def assignment(self) -> frozenset[TopicPartition]:
        """The partitions the sidecar holds for this subscription, as last told on this stream."""
        return frozenset(self._assignment)

    # -- batches ---------------------------------------------------------------------------

    def __aiter__(self) -> SidecarConsumer:
        return self

    async def __anext__(self) -> Batch:
        if self._task is None:
            raise RuntimeError("use `async with SidecarConsumer(...)` (or await start()) first")
        while True:
            if self._error is not None:
                raise self._error
            if self._stopped:
                raise StopAsyncIteration
            item = await self._batches.get()
            if item is _WAKE:
                self._batches.put_nowait(_WAKE)  # wake any other waiting iterator too
                continue
            assert isinstance(item, Batch)
            if item.alive:  # batches of a lost stream were taken back by the sidecar
                return item

    async def ack(self, *items: Batch | Record | Iterable[Batch | Record]) -> None:
        """Acks batches and/or records in one request per stream.

        Those still open are sent even if some belong to a lost stream; then StreamLostError
        is raised for the lost ones.
        """
        await self._settle(
            items, lambda ids, refs: pb.ConsumeRequest(ack=pb.Ack(batch_ids=ids, records=refs))
        )

    async def nack(
        self,
        *items: Batch | Record | Iterable[Batch | Record],
        retry_after_ms: int = 0,
        reason: str = "",
        dead_letter: bool = False,
    ) -> None:
        """Nacks batches and/or records in one request per stream (see `Record.nack`)."""
        await self._settle(
            items,
            lambda ids, refs: pb.ConsumeRequest(
                nack=_nack_pb(ids, refs, retry_after_ms, reason, dead_letter)
            ),
        )

    async def _settle(
        self,
        items: Iterable[Batch | Record | Iterable[Batch | Record]],
        build: Callable[[list[int], list[pb.RecordRef]], pb.ConsumeRequest],
    ) -> None:
        by_conn: dict[_Connection, tuple[list[int], list[pb.RecordRef]]] = {}
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

    # -- events ----------------------------------------------------------------------------

    def events(self) -> EventStream[Event]:
        """An async iterator of every event from now on (plus those nobody has seen yet).

        It ends when the consumer closes. Each iterator gets every event; keep up with it,
        events are queued without bound (they are few: rebalances, rejections, reconnects).
        """
        queue: asyncio.Queue[Event | None] = asyncio.Queue()
        while self._unclaimed:
            queue.put_nowait(self._unclaimed.popleft())
        if self._closed:
            queue.put_nowait(None)
        self._listeners.queues.append(queue)
        return EventStream(queue, lambda: self._listeners.queues.remove(queue))

    async def _emit(self, event: Event) -> None:
        listeners = self._listeners
        for queue in listeners.queues:
            queue.put_nowait(event)
        handled = bool(listeners.queues)
        for callback in (listeners.specific(event), listeners.on_event):
            if callback is None:
                continue
            handled = True
            try:
                result = callback(event)
                if result is not None:
                    await result
            except Exception:
                log.exception("event callback failed", extra={"event": repr(event)})
        if not listeners.queues:
            self._unclaimed.append(event)
        if not handled:
            level = logging.WARNING if isinstance(event, Rejected | Draining) else logging.INFO
            log.log(level, "kafka-sidecar: %s (no listener for this event)", event)

    def _end_events(self) -> None:
        for queue in self._listeners.queues:
            queue.put_nowait(None)

    # -- the stream's life -----------------------------------------------------------------

    def _stop(self, error: BaseException | None = None) -> None:
        if error is not None and self._error is None:
            self._error = error
        self._stopped = True
        self._interrupt.set()
        self._batches.put_nowait(_WAKE)

    def _backoff(self, failures: int) -> float:
        ceiling = min(self._initial_backoff * 2.0 ** max(failures - 1, 0), self._max_backoff)
        return float(ceiling * random.uniform(0.5, 1.0))

    async def _run(self) -> None:
        try:
            await self._supervise()
        except Exception as exc:  # a bug: say so, and never leave `async for` hanging
            log.exception("kafka-sidecar consumer failed")
            self._stop(SidecarError(f"the consumer failed: {exc!r}"))
        finally:
            if not self._stopped:
                self._stop(SidecarError("the consumer was cancelled"))

    async def _supervise(self) -> None:
        """Opens streams and reads them, until closed or a fatal error; runs as one task."""
        loop = asyncio.get_running_loop()
        failures = 0
        down_since = loop.time()
        streams = 0
        while not self._closing.is_set() and not self._stopped:
            conn = _Connection(self, pb.ConsumeRequest(open=self._open))
            error: BaseException | None = asyncio.CancelledError("the consumer was closed")
            try:
                try:
                    opened = await self._open_stream(conn)
                except (grpc.aio.AioRpcError, SidecarError) as exc:
                    error = exc
                else:
                    failures = 0
                    streams += 1
                    conn.stream_id = opened.stream_id
                    self.opened = opened
                    self._conn = conn
                    self._assignment.clear()
                    self._connected.set()
                    await self._emit(Connected(opened, reconnected=streams > 1))
                    error = await self._read(conn)
                    down_since = loop.time()
            finally:
                conn.mark_lost(_describe(error))
                if self._conn is conn:
                    self._conn = None
                    self._assignment.clear()
                await conn.close()
            if self._closing.is_set() or self._stopped:
                return
            if isinstance(error, grpc.aio.AioRpcError) and error.code() in FATAL_CODES:
                self._stop(StreamError(error.code(), error.details() or ""))
                await self._emit(Disconnected(error, None))
                return
            failures += 1
            if not self._reconnect or (
                self._reconnect_timeout is not None
                and loop.time() - down_since > self._reconnect_timeout
            ):
                self._stop(
                    SidecarUnavailableError(
                        f"no stream to {self.target} for subscription {self.subscription!r}: "
                        f"{_describe(error)}"
                    )
                )
                await self._emit(Disconnected(error, None))
                return
            delay = self._backoff(failures)
            if failures == 1 or failures % 10 == 0:
                log.warning(
                    "kafka-sidecar at %s unavailable (%s); retrying in %.1fs",
                    self.target,
                    _describe(error),
                    delay,
                )
            if streams and failures == 1:
                await self._emit(Disconnected(error, delay))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._interrupt.wait()

    async def _open_stream(self, conn: _Connection) -> pb.Opened:
        response = await conn.call.read()
        if response is grpc.aio.EOF:
            raise SidecarError("the stream ended before `opened`")
        if response.WhichOneof("kind") != "opened":
            raise SidecarError(f"expected `opened`, got {response.WhichOneof('kind')!r}")
        opened: pb.Opened = response.opened
        return opened

    async def _read(self, conn: _Connection) -> BaseException | None:
        """Reads one stream to its end: None for a clean end, else the error that ended it."""
        while True:
            try:
                response = await conn.call.read()
            except grpc.aio.AioRpcError as exc:
                failed: BaseException = exc
                return failed
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise
                return None  # the call was cancelled by aclose(): not an error
            if response is grpc.aio.EOF:
                if self._closing.is_set() or self._stopped:
                    return None
                return SidecarError("the sidecar ended the stream")
            await self._dispatch(conn, response)

    async def _dispatch(self, conn: _Connection, response: pb.ConsumeResponse) -> None:
        kind = response.WhichOneof("kind")
        if kind == "batch":
            self._batches.put_nowait(Batch(conn, response.batch))
        elif kind == "partitions_assigned":
            parts = _tps(response.partitions_assigned.partitions)
            self._assignment.update(parts)
            await self._emit(PartitionsAssigned(parts))
        elif kind == "partitions_revoked":
            parts = _tps(response.partitions_revoked.partitions)
            self._assignment.difference_update(parts)
            await self._emit(PartitionsRevoked(parts))
        elif kind == "rejected":
            rejected = response.rejected
            await self._emit(
                Rejected(
                    batch_ids=tuple(rejected.batch_ids),
                    records=tuple(
                        RecordRef(r.topic, r.partition, r.offset) for r in rejected.records
                    ),
                    reason=RejectReason.of(rejected.reason),
                    message=rejected.message,
                )
            )
        elif kind == "draining":
            await self._emit(Draining(response.draining.deadline_ms))
        elif kind == "caught_up":
            await self._emit(
                CaughtUp(
                    {
                        TopicPartition(o.topic, o.partition): o.offset
                        for o in response.caught_up.end_offsets
                    }
                )
            )
        else:  # a newer sidecar's message: not ours to fail on
            log.debug("ignoring an unknown response %r", kind)


def _flatten(
    items: Iterable[Batch | Record | Iterable[Batch | Record]],
) -> Iterator[Batch | Record]:
    for item in items:
        if isinstance(item, Batch | Record):
            yield item
        else:
            yield from item


def _tps(parts: Iterable[pb.TopicPartition]) -> tuple[TopicPartition, ...]:
    return tuple(TopicPartition(p.topic, p.partition) for p in parts)


def _describe(error: BaseException | None) -> str:
    if error is None:
        return "ended"
    if isinstance(error, grpc.aio.AioRpcError):
        return f"{error.code().name}: {error.details()}"
    return str(error) or type(error).__name__
