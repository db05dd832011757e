"""Dead letters: records the app gave up on, written to the subscription's DLQ topic.

A dead-lettered record is settled only once the broker has confirmed the DLQ write (acks=all,
idempotent producer), so a crash or a failing DLQ never loses it: until then it stays
unsettled in the ledger and its partition's commit stays behind it.

Writes are pipelined (up to `max_in_flight` sends awaiting the broker at once) and every letter
fails and retries on its own: a letter the DLQ refuses (too large, no ACL, no topic) holds back
its own source partition only, while other letters, and so other partitions, keep flowing and
committing. A failing letter is never dropped: transient causes are retried with exponential
backoff, permanent ones every `permanent_retry_s` (an operator may fix the ACL or the topic
config), and while any letter is failing the subscription reports NOT_SERVING, logs name the
record and the cause, and `failures` counts each failed attempt by cause.

Two things about aiokafka 0.14's idempotent producer shape this module:

- A produce batch the broker refuses for good (e.g. MESSAGE_TOO_LARGE) has already taken its
  sequence numbers, and aiokafka does not rewind them: every later batch to that DLQ partition
  fails with OutOfOrderSequenceNumber, forever, on that producer. So a producer whose write
  failed is retired and replaced by a fresh one (new producer id, sequences from 0), and the
  letters that failed only because of that gap are resent at once, uncounted.
- Retriable errors (leader moves, NOT_ENOUGH_REPLICAS, a deleted topic's
  UNKNOWN_TOPIC_OR_PARTITION, a dropped connection) never reach the caller: with idempotence
  aiokafka retries a batch until it succeeds. A send still unconfirmed after
  `confirm_timeout_s` therefore counts as a transient failure (logged, health degraded) while
  the writer keeps waiting for it: resending would only duplicate it.

Letters that look too large for a default broker (over `LARGE_RECORD_BYTES`), letters with
neither key nor value (aiokafka's `send` refuses those), letters refused as too large in a
batch they shared with others, and retries of permanently failed letters go through a
separate "isolated" producer, one record per batch. A refusal there poisons only that
producer, never the one carrying the bulk of the traffic, and a batch of one gets the broker's
verdict on that record alone, not on a batch it happened to share.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    OutOfOrderSequenceNumber,
    ProducerClosed,
    RecordListTooLargeError,
    RecordTooLargeError,
    TopicAuthorizationFailedError,
    UnknownTopicOrPartitionError,
)
from aiokafka.partitioner import DefaultPartitioner

from sidecar import permissions
from sidecar.inflight import Pending
from sidecar.wire import Message

log = logging.getLogger("sidecar.deadletters")

HealthCallback = Callable[[bool], Awaitable[None]]

#: Failure causes, the `cause` label of kafka_sidecar_dead_letter_failures_total.
RECORD_TOO_LARGE = "record_too_large"
AUTHORIZATION = "authorization"
UNKNOWN_TOPIC = "unknown_topic"
TRANSIENT = "transient"
CAUSES = (RECORD_TOO_LARGE, AUTHORIZATION, UNKNOWN_TOPIC, TRANSIENT)
PERMANENT_CAUSES = frozenset({RECORD_TOO_LARGE, AUTHORIZATION, UNKNOWN_TOPIC})

#: Backoff of a letter failing for a transient cause: doubles from the first to the last.
TRANSIENT_BACKOFF_S = (0.5, 30.0)
#: Retry interval of a letter failing for a permanent cause.
PERMANENT_RETRY_S = 60.0
#: A send the broker has not confirmed after this long counts as failing (transient).
CONFIRM_TIMEOUT_S = 30.0
#: How long `stop()` waits for each producer to flush.
STOP_TIMEOUT_S = 10.0

#: The producers' `max_request_size`. In aiokafka 0.14 it does one thing only: `send()` refuses
#: a record whose `estimate_size_in_bytes(key, value, headers)` exceeds it (default 1 MiB,
#: below what a broker may accept). It sizes no buffer (a batch's bytearray grows as records
#: are appended, up to `max_batch_size`; a bigger record always gets a batch of its own) and,
#: despite its docstring, caps no request. So sizing it to each source record buys nothing
#: over one generous ceiling: the broker (`message.max.bytes`, the topic's
#: `max.message.bytes`) judges what fits. The ceiling is Kafka's default
#: `socket.request.max.bytes`: a request above that is not refused with an error code, the
#: broker drops the connection, which aiokafka retries forever and which fails every other
#: batch of that request. The isolated lane sends with `send_batch`, which skips the check, so
#: the writer makes it itself on each DLQ record (source key, value and headers plus the x-dlq
#: headers). Above it: MessageSizeTooLargeError, cause record_too_large.
MAX_REQUEST_SIZE = 100 * 1024 * 1024
#: Per-partition batch size of the pipelined producer (aiokafka default 16 KiB): holds dozens
#: of typical dead letters, so one produce request carries a whole round of in-flight sends,
#: and stays far below a default broker's `max.message.bytes` (1 MiB), so small letters are
#: not refused for the company they keep.
MAX_BATCH_SIZE = 256 * 1024
#: DLQ records above this (a default broker's `message.max.bytes` is 1 MiB + 12) are sent
#: through the isolated producer, one per batch: the likeliest to be refused stay out of the
#: pipelined producer's sequence numbers.
LARGE_RECORD_BYTES = 1_000_000


class DeadLetterError(Exception):
    """The DLQ cannot be used at all (e.g. its topic does not exist): a startup error."""


@dataclass(slots=True)
class DeadLetter:
    #: The record (a run of one) in the state machine, which its confirmation settles.
    pending: Pending
    reason: str
    #: The record itself, parsed from its `Record` bytes once, for writing it.
    message: Message


def dlq_headers(
    letter: DeadLetter, group_id: str, failed_at_ms: int
) -> list[tuple[str, bytes | None]]:
    """The original headers, in order, then the x-dlq-* headers of docs/DESIGN.md §4.6."""
    message = letter.message
    headers: list[tuple[str, bytes | None]] = list(message.headers)
    extra = {
        "x-dlq-original-topic": message.topic,
        "x-dlq-original-partition": str(message.partition),
        "x-dlq-original-offset": str(message.offset),
        "x-dlq-original-timestamp": str(message.timestamp),
        "x-dlq-consumer-group": group_id,
        "x-dlq-reason": letter.reason,
        "x-dlq-attempts": str(letter.pending.attempts),
        "x-dlq-failed-at": str(failed_at_ms),
    }
    headers.extend((key, value.encode()) for key, value in extra.items())
    return headers


#: What `send()` raises on a producer that works: the client-side size check, no metadata for
#: the topic (after `request_timeout_ms`), a partition's batch not drained in time.
_REFUSED_BY_SEND = (
    MessageSizeTooLargeError,
    UnknownTopicOrPartitionError,
    TopicAuthorizationFailedError,
    KafkaTimeoutError,
)
_TOO_LARGE = (MessageSizeTooLargeError, RecordListTooLargeError, RecordTooLargeError)
_AUTHORIZATION = (TopicAuthorizationFailedError, ClusterAuthorizationFailedError)


def classify(exc: BaseException) -> str:
    """The failure cause of a DLQ write error: one of `CAUSES`.

    Permanent causes are the broker's (or aiokafka's client-side) verdict on the record or the
    principal: retrying soon won't help, an operator has to act. Everything else, timeouts and
    connection trouble included, is `transient`. Wrapped errors are judged by their cause.
    """
    seen = 0
    current: BaseException | None = exc
    while current is not None and seen < 8:
        if isinstance(current, _TOO_LARGE):
            return RECORD_TOO_LARGE
        if isinstance(current, _AUTHORIZATION) or any(
            "AuthorizationFailed" in cls.__name__ for cls in type(current).__mro__
        ):
            return AUTHORIZATION
        if isinstance(current, UnknownTopicOrPartitionError):
            return UNKNOWN_TOPIC
        current = current.__cause__
        seen += 1
    return TRANSIENT


@dataclass(frozen=True, slots=True)
class FailingLetter:
    """A letter whose DLQ write is failing, for status reports."""

    letter: DeadLetter
    cause: str
    error: str
    #: Failed attempts so far.
    failures: int
    #: Wall-clock time (s since the epoch) of its first failure.
    since: float
    #: For cause `authorization`: the permission the broker wants (`missing IAM permission
    #: kafka-cluster:WriteData on arn:...`); "" otherwise.
    missing: str = ""


@dataclass(slots=True, eq=False)
class _Entry:
    letter: DeadLetter
    failed_at_ms: int
    #: Current cause while failing, None while not.
    cause: str | None = None
    error: str = ""
    #: The missing permission while failing for cause `authorization`.
    missing: permissions.PermissionDenied | None = None
    failures: int = 0
    since: float = 0.0
    backoff: float = TRANSIENT_BACKOFF_S[0]
    #: Holds one of the `max_in_flight` slots.
    slot: bool = False
    isolate: bool = False
    #: The current attempt is past `confirm_timeout_s`.
    stuck: bool = False
    written: bool = False
    timer: asyncio.TimerHandle | None = None


@dataclass(slots=True, eq=False)
class _Generation:
    """One producer. Retired once a write through it failed (its sequence numbers for that
    DLQ partition are out of step with the broker's), closed once nothing waits on it."""

    producer: AIOKafkaProducer
    isolated: bool
    retired: bool = False
    outstanding: int = 0


@dataclass(slots=True, eq=False)
class _Lane:
    isolated: bool
    current: _Generation | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class DeadLetterWriter:
    """Writes one subscription's dead letters, pipelined, until the broker confirms each."""

    def __init__(
        self,
        topic: str,
        group_id: str,
        client_kwargs: dict[str, Any],
        *,
        config_key: str,
        subscription: str = "",
        max_in_flight: int = 64,
        permanent_retry_s: float = PERMANENT_RETRY_S,
        confirm_timeout_s: float = CONFIRM_TIMEOUT_S,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self.topic = topic
        self.group_id = group_id
        self.max_in_flight = max_in_flight
        self._config_key = config_key
        #: The subscription's name, for log lines ("" when not known).
        self._subscription = subscription
        self._client_kwargs = client_kwargs
        self._permanent_retry_s = permanent_retry_s
        self._confirm_timeout_s = confirm_timeout_s
        self._ready: asyncio.Queue[_Entry] = asyncio.Queue()
        self._slots = asyncio.Semaphore(max_in_flight)
        self._main = _Lane(isolated=False)
        self._isolated = _Lane(isolated=True)
        self._retired: set[_Generation] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing: set[asyncio.Task[None]] = set()
        self._failing: dict[_Entry, None] = {}
        self._pending: set[_Entry] = set()
        #: Attempts under way, oldest first, with their start (loop time).
        self._attempts: dict[_Entry, float] = {}
        self._health_changed = asyncio.Event()
        self._on_written: Callable[[DeadLetter], None] | None = None
        self._partitioner = DefaultPartitioner()
        self._log_budget = _LogBudget()
        #: Whether `start` found the topic (False until the brokers could be asked).
        self.checked = False
        #: Letters the broker confirmed.
        self.written = 0
        #: Failed write attempts, by cause (kafka_sidecar_dead_letter_failures_total).
        self.failures: dict[str, int] = dict.fromkeys(CAUSES, 0)

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Connects, and checks that the DLQ topic exists (the sidecar never creates topics).

        A topic that is missing, or that the sidecar may not describe, is a DeadLetterError (a
        configuration error, naming the key). Brokers it cannot reach, or that refuse its
        sign-in, raise aiokafka's KafkaError and leave the topic `checked` False: the
        subscription checks again before it joins its group, not SERVING meanwhile."""
        gen = await self._generation(self._main)
        metadata = await gen.producer.client.fetch_all_metadata()
        if self.topic not in metadata.topics():
            try:
                hidden = await permissions.undescribable(gen.producer.client, [self.topic])
            except KafkaError:
                hidden = []
            await self.stop()
            if hidden:
                raise DeadLetterError(
                    f"{self._config_key}: dead-letter topic {self.topic!r} cannot be described: "
                    f"{permissions.describe_topic(self.topic)}"
                )
            raise DeadLetterError(
                f"{self._config_key}: dead-letter topic {self.topic!r} does not exist; create it "
                "(the sidecar never creates topics)"
            )
        self.checked = True

    async def stop(self) -> None:
        """Stops writing and closes the producers. Letters not yet confirmed stay unsettled
        (the caller redelivers them after a restart): nothing is reported written that the
        broker did not confirm."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for entry in self._pending:
            if entry.timer is not None:
                entry.timer.cancel()
        gens = [lane.current for lane in (self._main, self._isolated) if lane.current]
        gens.extend(self._retired)
        self._main.current = self._isolated.current = None
        self._retired.clear()
        await asyncio.gather(*(self._close(gen) for gen in gens), *self._closing)

    # -- the interface the dispatcher uses -------------------------------------------------

    def submit(self, letter: DeadLetter) -> None:
        """Queues a letter for writing (never blocks): `run`'s `on_written` says when the
        broker confirmed it."""
        entry = _Entry(letter, failed_at_ms=int(time.time() * 1000))
        self._pending.add(entry)
        self._ready.put_nowait(entry)

    async def run(
        self,
        on_written: Callable[[DeadLetter], None],
        set_healthy: HealthCallback,
    ) -> None:
        """Writes submitted letters, up to `max_in_flight` at once, each retried on its own
        until the broker confirms it; then calls `on_written(letter)`, once per letter.
        `set_healthy(False)` while any letter is failing, `set_healthy(True)` once none is."""
        self._on_written = on_written
        health = asyncio.gather(self._report_health(set_healthy), self._watch_attempts())
        try:
            while True:
                await self._slots.acquire()
                try:
                    entry = await self._ready.get()
                except BaseException:
                    self._slots.release()
                    raise
                if entry.written:
                    self._slots.release()
                    continue
                entry.slot = True
                task = asyncio.create_task(self._attempt(entry))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        finally:
            health.cancel()
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(health, *tasks, return_exceptions=True)

    @property
    def failing(self) -> list[FailingLetter]:
        """The letters currently failing, oldest first, with their cause."""
        return [
            FailingLetter(
                entry.letter,
                entry.cause or TRANSIENT,
                entry.error,
                entry.failures,
                entry.since,
                str(entry.missing) if entry.missing is not None else "",
            )
            for entry in self._failing
        ]

    # -- one attempt -----------------------------------------------------------------------

    async def _attempt(self, entry: _Entry) -> None:
        entry.stuck = False
        self._attempts[entry] = asyncio.get_running_loop().time()
        gen: _Generation | None = None
        try:
            isolated = entry.isolate or self._needs_isolation(entry)
            gen = await self._generation(self._isolated if isolated else self._main)
            gen.outstanding += 1
            try:
                sent = await self._send(gen, entry)
            except Exception as exc:
                # Refused before it was batched: the sequence numbers are untouched.
                if isinstance(exc, ProducerClosed) or gen.retired:
                    self._requeue(entry)
                    return
                if not isinstance(exc, _REFUSED_BY_SEND):
                    # aiokafka's sender task died: the producer re-raises its error forever.
                    self._retire(gen, exc)
                # A topic refused here was refused in metadata: DescribeTopic, not WriteData.
                self._failed(entry, exc, describing=True)
                return
            try:
                await sent
            except Exception as exc:
                if gen.retired and isinstance(exc, OutOfOrderSequenceNumber):
                    # Collateral of another letter's failure on this (now retired) producer.
                    self._requeue(entry)
                    return
                self._retire(gen, exc)
                if not gen.isolated and classify(exc) == RECORD_TOO_LARGE:
                    # The broker judges whole batches: this letter may only have shared one
                    # with a record too large. A batch of its own gets its own verdict.
                    entry.isolate = True
                    self._requeue(entry)
                    return
                self._failed(entry, exc)
                return
            self._written(entry)
        except asyncio.CancelledError:
            if not entry.written and entry.timer is None:
                self._ready.put_nowait(entry)
            raise
        except Exception as exc:  # e.g. a replacement producer that cannot connect
            self._failed(entry, exc)
        finally:
            del self._attempts[entry]
            self._release(entry)
            if gen is not None:
                gen.outstanding -= 1
                self._maybe_close(gen)

    def _needs_isolation(self, entry: _Entry) -> bool:
        message = entry.letter.message
        if message.key is None and message.value is None:
            return True  # AIOKafkaProducer.send asserts one of them is set
        return _approx_size(message.key, message.value, message.headers) > LARGE_RECORD_BYTES

    async def _send(self, gen: _Generation, entry: _Entry) -> asyncio.Future[Any]:
        """Hands the DLQ record to the producer; returns the future of its confirmation."""
        message = entry.letter.message
        headers = dlq_headers(entry.letter, self.group_id, entry.failed_at_ms)
        producer = gen.producer
        if not gen.isolated:
            future: asyncio.Future[Any] = await producer.send(
                self.topic, value=message.value, key=message.key, headers=headers
            )
            return future
        size = _approx_size(message.key, message.value, headers)
        if size > MAX_REQUEST_SIZE:
            # send_batch skips aiokafka's size check; make it here (see MAX_REQUEST_SIZE).
            raise MessageSizeTooLargeError(
                f"the DLQ record is about {size} bytes, above max_request_size {MAX_REQUEST_SIZE}"
            )
        partitions = sorted(await producer.partitions_for(self.topic))
        available = list(producer.client.cluster.available_partitions_for_topic(self.topic))
        partition = self._partitioner(message.key, partitions, available)
        batch = producer.create_batch()
        batch.append(key=message.key, value=message.value, timestamp=None, headers=headers)
        future = await producer.send_batch(batch, self.topic, partition=partition)
        return future

    # -- outcomes --------------------------------------------------------------------------

    def _written(self, entry: _Entry) -> None:
        if entry.written:
            return
        entry.written = True
        self._pending.discard(entry)
        self.written += 1
        if entry.cause is not None:
            del self._failing[entry]
            self._health_changed.set()
            log.info(
                f"dead letter for {_where(entry)} written to {self.topic} after "
                f"{entry.failures} failed attempts",
                extra={**self._fields(entry), "failures": entry.failures},
            )
        assert self._on_written is not None
        try:
            self._on_written(entry.letter)
        except Exception:
            log.exception("on_written failed", extra=self._fields(entry))

    def _failed(self, entry: _Entry, exc: BaseException, *, describing: bool = False) -> None:
        """Counts and logs a failed attempt and schedules the next one. `describing`: the
        producer refused it before sending, so a topic authorization error came from a
        metadata request."""
        cause = classify(exc)
        self.failures[cause] += 1
        entry.failures += 1
        entry.error = repr(exc)
        entry.missing = self._missing(exc, describing) if cause == AUTHORIZATION else None
        if entry.cause is None:
            entry.since = time.time()
            self._failing[entry] = None
            self._health_changed.set()
        entry.cause = cause
        if cause in PERMANENT_CAUSES:
            delay = self._permanent_retry_s
            entry.isolate = True
        else:
            delay = entry.backoff
            entry.backoff = min(entry.backoff * 2, TRANSIENT_BACKOFF_S[1])
        self._log_failure(entry, f"retrying in {delay:g} s")
        self._release(entry)
        entry.timer = asyncio.get_running_loop().call_later(delay, self._retry, entry)

    def _missing(self, exc: BaseException, describing: bool) -> permissions.PermissionDenied:
        """The permission an authorization error on a DLQ write stands for: WriteData on the
        DLQ topic (the produce request), DescribeTopic (its metadata), or WriteDataIdempotently
        (the idempotent producer's InitProducerId: ClusterAuthorizationFailedError)."""
        if permissions.denial_class(exc) == "ClusterAuthorizationFailedError":
            return permissions.PermissionDenied([permissions.idempotent_write()])
        if describing:
            return permissions.PermissionDenied([permissions.describe_topic(self.topic)])
        return permissions.PermissionDenied([permissions.write_topic(self.topic)])

    async def _watch_attempts(self) -> None:
        """Flags attempts the broker has not confirmed within `confirm_timeout_s` (one sweep
        a second rather than a timer per send: timers cost more than the send itself)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(1.0, self._confirm_timeout_s / 4))
            due = loop.time() - self._confirm_timeout_s
            for entry, started in self._attempts.items():
                if started > due:
                    break
                if not entry.stuck:
                    entry.stuck = True
                    self._unconfirmed(entry)

    def _unconfirmed(self, entry: _Entry) -> None:
        """The attempt has not been confirmed after `confirm_timeout_s`: aiokafka keeps
        retrying it (idempotent batches never expire), so the letter waits on, counted as a
        transient failure, and stops holding an in-flight slot."""
        if entry.written:
            return
        self.failures[TRANSIENT] += 1
        entry.failures += 1
        if entry.cause is None:
            entry.since = time.time()
            self._failing[entry] = None
            self._health_changed.set()
        self._release(entry)
        self._still_unconfirmed(entry, entry.failures)

    def _still_unconfirmed(self, entry: _Entry, failures: int) -> None:
        """Says so again every max transient backoff until the attempt ends."""
        if entry.written or entry.failures != failures:
            return  # confirmed, or failed: a new round
        entry.cause = TRANSIENT
        entry.missing = None
        entry.error = f"not confirmed by the broker after {self._confirm_timeout_s:g} s"
        self._log_failure(entry, "still waiting for the broker")
        asyncio.get_running_loop().call_later(
            TRANSIENT_BACKOFF_S[1], self._still_unconfirmed, entry, failures
        )

    def _retry(self, entry: _Entry) -> None:
        entry.timer = None
        if not entry.written:
            self._ready.put_nowait(entry)

    def _requeue(self, entry: _Entry) -> None:
        self._release(entry)
        self._ready.put_nowait(entry)

    def _release(self, entry: _Entry) -> None:
        if entry.slot:
            entry.slot = False
            self._slots.release()

    # -- producers -------------------------------------------------------------------------

    def _new_producer(self) -> AIOKafkaProducer:
        return AIOKafkaProducer(
            **{
                **self._client_kwargs,
                "acks": "all",
                "enable_idempotence": True,
                # No linger: aiokafka keeps one produce request in flight per broker, and
                # the letters sent meanwhile fill the next batch; lingering would only add
                # its delay to every round trip of the in-flight window (measured: ~2x slower
                # at 5 ms).
                "linger_ms": 0,
                "max_batch_size": MAX_BATCH_SIZE,
                "max_request_size": MAX_REQUEST_SIZE,
            }
        )

    async def _generation(self, lane: _Lane) -> _Generation:
        gen = lane.current
        if gen is not None:
            return gen
        async with lane.lock:
            if lane.current is None:
                producer = self._new_producer()
                try:
                    await producer.start()
                except BaseException:
                    with contextlib.suppress(Exception):
                        await producer.stop()
                    raise
                lane.current = _Generation(producer, lane.isolated)
            return lane.current

    def _retire(self, gen: _Generation, exc: BaseException) -> None:
        if gen.retired:
            return
        gen.retired = True
        for lane in (self._main, self._isolated):
            if lane.current is gen:
                lane.current = None
        self._retired.add(gen)
        log.warning(
            "a dead-letter write failed; replacing its producer (aiokafka's idempotent "
            "producer does not rewind sequence numbers after a refused batch)",
            extra={
                "dlq_topic": self.topic,
                "isolated": gen.isolated,
                "error": repr(exc),
            },
        )

    def _maybe_close(self, gen: _Generation) -> None:
        if gen.retired and gen.outstanding == 0 and gen in self._retired:
            self._retired.discard(gen)
            task = asyncio.create_task(self._close(gen))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    @staticmethod
    async def _close(gen: _Generation) -> None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(STOP_TIMEOUT_S):
                await gen.producer.stop()

    # -- reporting -------------------------------------------------------------------------

    async def _report_health(self, set_healthy: HealthCallback) -> None:
        reported = True
        while True:
            await self._health_changed.wait()
            self._health_changed.clear()
            healthy = not self._failing
            if healthy != reported:
                try:
                    await set_healthy(healthy)
                except Exception:
                    log.exception("set_healthy failed", extra={"dlq_topic": self.topic})
                reported = healthy
                if healthy:
                    log.info("dead-letter writes recovered", extra={"dlq_topic": self.topic})

    def _log_failure(self, entry: _Entry, then: str) -> None:
        if not self._log_budget.take():
            return
        suppressed = self._log_budget.suppressed()
        why = f"{entry.cause} ({entry.error})"
        extra: dict[str, object] = {}
        if entry.missing is not None:
            why = f"{entry.cause}: {entry.missing} ({self._config_key}; {entry.error})"
            extra = {"config_key": self._config_key, **entry.missing.fields()}
        log.error(
            f"dead-letter write failed for {_where(entry)} to {self.topic}: {why}; the record "
            f"stays unsettled, {then}"
            + (f" ({suppressed} similar lines suppressed)" if suppressed else ""),
            extra={
                **self._fields(entry),
                "cause": entry.cause,
                "error": entry.error,
                "failures": entry.failures,
                **extra,
            },
        )

    def _fields(self, entry: _Entry) -> dict[str, object]:
        topic, partition = entry.letter.pending.tp
        return {
            **({"subscription": self._subscription} if self._subscription else {}),
            "topic": topic,
            "partition": partition,
            "offset": entry.letter.pending.offset,
            "dlq_topic": self.topic,
        }


class _LogBudget:
    """At most `burst` failure lines per `window_s`: thousands of letters failing together
    (a missing ACL) would otherwise log thousands of lines per retry round."""

    __slots__ = ("_burst", "_dropped", "_left", "_reset_at", "_window_s")

    def __init__(self, burst: int = 20, window_s: float = 10.0) -> None:
        self._burst = burst
        self._window_s = window_s
        self._left = burst
        self._reset_at = 0.0
        self._dropped = 0

    def take(self) -> bool:
        now = time.monotonic()
        if now >= self._reset_at:
            self._reset_at = now + self._window_s
            self._left = self._burst
        if self._left > 0:
            self._left -= 1
            return True
        self._dropped += 1
        return False

    def suppressed(self) -> int:
        dropped, self._dropped = self._dropped, 0
        return dropped


def _where(entry: _Entry) -> str:
    topic, partition = entry.letter.pending.tp
    return f"{topic}[{partition}]@{entry.letter.pending.offset}"


def _approx_size(
    key: bytes | None, value: bytes | None, headers: Sequence[tuple[str, bytes | None]]
) -> int:
    """An upper bound of a record's size in a batch, like aiokafka's estimate."""
    size = 61 + 21  # batch header + per-record overhead
    size += len(key) if key is not None else 0
    size += len(value) if value is not None else 0
    for name, data in headers:
        size += len(name) + (len(data) if data is not None else 0) + 10
    return size
