"""The consumer: one subscription's batches over a stream that it reopens when it breaks.

It holds what outlives a stream (settings, the batch queue, the listeners, the assignment)
and runs one task that opens streams, reads them and waits out the backoff in between, so
the app only iterates and settles, and never sees the sidecar restart beyond a lost batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Any

import grpc

from kafkasidecar._connection import Connection
from kafkasidecar._events import (
    Callback,
    CaughtUp,
    Connected,
    Disconnected,
    Draining,
    Event,
    PartitionsAssigned,
    PartitionsRevoked,
    Rejected,
    RejectReason,
)
from kafkasidecar._exceptions import (
    SidecarError,
    SidecarUnavailableError,
    StreamError,
    StreamLostError,
)
from kafkasidecar._listeners import EventStream, Listeners
from kafkasidecar._models import (
    Batch,
    Output,
    Record,
    RecordRef,
    TopicPartition,
    ack_with_outputs,
    nack_pb,
    settle,
)
from kafkasidecar._reconnect import FATAL_CODES, backoff
from kafkasidecar.v1 import consumer_pb2 as pb

# The name the client logged under before its split into modules: apps configure that one.
log = logging.getLogger("kafkasidecar.client")

#: Put on the batch queue to wake an iterator waiting for a batch: the consumer stopped.
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
        self._listeners = Listeners(on_assigned, on_revoked, on_rejected, on_draining, on_event)
        self._batches: asyncio.Queue[Batch | object] = asyncio.Queue()
        self._conn: Connection | None = None
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
            self._listeners.end()

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

    async def ack(
        self,
        *items: Batch | Record | Iterable[Batch | Record],
        outputs: Iterable[Output] = (),
    ) -> None:
        """Acks batches and/or records in one request per stream.

        Those still open are sent even if some belong to a lost stream; then StreamLostError
        is raised for the lost ones.

        `outputs` are records for the sidecar to produce for the records this ack settles,
        which it settles only once they are written (see :class:`Output`). They go in one
        request, so the items must then be of one stream (and, on a transactional
        subscription, of one partition), and not all settled already: else ValueError, and
        nothing is settled.
        """
        outs = list(outputs)
        if outs:
            await ack_with_outputs(items, outs)
            return
        await settle(
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
        await settle(
            items,
            lambda ids, refs: pb.ConsumeRequest(
                nack=nack_pb(ids, refs, retry_after_ms, reason, dead_letter)
            ),
        )

    # -- events ----------------------------------------------------------------------------

    def events(self) -> EventStream[Event]:
        """An async iterator of every event from now on (plus those nobody has seen yet).

        It ends when the consumer closes. Each iterator gets every event; keep up with it,
        events are queued without bound (they are few: rebalances, rejections, reconnects).
        """
        return self._listeners.stream(closed=self._closed)

    # -- the stream's life -----------------------------------------------------------------

    def _stop(self, error: BaseException | None = None) -> None:
        if error is not None and self._error is None:
            self._error = error
        self._stopped = True
        self._interrupt.set()
        self._batches.put_nowait(_WAKE)

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
            conn = Connection(
                self.target,
                pb.ConsumeRequest(open=self._open),
                credentials=self._credentials,
                channel_options=self._channel_options,
                metadata=self._metadata,
            )
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
                    conn.transactional = opened.transactional
                    self.opened = opened
                    self._conn = conn
                    self._assignment.clear()
                    self._connected.set()
                    await self._listeners.emit(Connected(opened, reconnected=streams > 1))
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
                await self._listeners.emit(Disconnected(error, None))
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
                await self._listeners.emit(Disconnected(error, None))
                return
            delay = backoff(failures, self._initial_backoff, self._max_backoff)
            if failures == 1 or failures % 10 == 0:
                log.warning(
                    "kafka-sidecar at %s unavailable (%s); retrying in %.1fs",
                    self.target,
                    _describe(error),
                    delay,
                )
            if streams and failures == 1:
                await self._listeners.emit(Disconnected(error, delay))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._interrupt.wait()

    async def _open_stream(self, conn: Connection) -> pb.Opened:
        response = await conn.call.read()
        if response is grpc.aio.EOF:
            raise SidecarError("the stream ended before `opened`")
        if response.WhichOneof("kind") != "opened":
            raise SidecarError(f"expected `opened`, got {response.WhichOneof('kind')!r}")
        opened: pb.Opened = response.opened
        return opened

    async def _read(self, conn: Connection) -> BaseException | None:
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

    async def _dispatch(self, conn: Connection, response: pb.ConsumeResponse) -> None:
        kind = response.WhichOneof("kind")
        if kind == "batch":
            self._batches.put_nowait(Batch(conn, response.batch))
        elif kind == "partitions_assigned":
            parts = _tps(response.partitions_assigned.partitions)
            self._assignment.update(parts)
            await self._listeners.emit(PartitionsAssigned(parts))
        elif kind == "partitions_revoked":
            parts = _tps(response.partitions_revoked.partitions)
            self._assignment.difference_update(parts)
            await self._listeners.emit(PartitionsRevoked(parts))
        elif kind == "rejected":
            rejected = response.rejected
            await self._listeners.emit(
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
            await self._listeners.emit(Draining(response.draining.deadline_ms))
        elif kind == "caught_up":
            await self._listeners.emit(
                CaughtUp(
                    {
                        TopicPartition(o.topic, o.partition): o.offset
                        for o in response.caught_up.end_offsets
                    }
                )
            )
        else:  # a newer sidecar's message: not ours to fail on
            log.debug("ignoring an unknown response %r", kind)


def _tps(parts: Iterable[pb.TopicPartition]) -> tuple[TopicPartition, ...]:
    return tuple(TopicPartition(p.topic, p.partition) for p in parts)


def _describe(error: BaseException | None) -> str:
    if error is None:
        return "ended"
    if isinstance(error, grpc.aio.AioRpcError):
        return f"{error.code().name}: {error.details()}"
    return str(error) or type(error).__name__
