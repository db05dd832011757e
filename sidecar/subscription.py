"""A subscription as the server and the daemon see it: streams attach to it, it reports its
status, resets its offsets, and shuts down. Two kinds: a consumer group shared by all of
its streams, and snapshots read privately per stream."""

from __future__ import annotations

import abc
import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import TopicPartition
from aiokafka.errors import KafkaConnectionError, KafkaError
from aiokafka.structs import OffsetAndMetadata

from kafkasidecar.v1 import consumer_pb2 as pb
from sidecar.auth import connection_failure, unreachable
from sidecar.config import SubscriptionConfig
from sidecar.consumer import GroupConsumer
from sidecar.deadletters import DeadLetterError, DeadLetterWriter
from sidecar.dispatcher import Dispatcher, Stream
from sidecar.inflight import Stats
from sidecar.ledger import Ledger
from sidecar.offsets import Change, OffsetsError, committed, selected_partitions, target_offsets
from sidecar.outputs import OutputWriter, Transactions
from sidecar.permissions import PermissionDenied
from sidecar.snapshot import SnapshotReader
from sidecar.stalls import Stalls
from sidecar.tracing import Tracing
from sidecar.wire import MODES

log = logging.getLogger("sidecar.subscription")

#: How often a subscription retries to join a group the broker refused it for want of a
#: permission. Nothing but a policy change helps, and MSK applies one within a minute or so;
#: retrying faster would only fill the log.
DENIED_RETRY_S = 30.0
#: The group's coordinator unknown this long means no broker answers: the subscription is not
#: SERVING, though it stays in its group. Longer than any broker failover (a SIGKILLed broker's
#: leaders move in ~10 s), shorter than the two minutes of NOT_SERVING that liveness allows.
COORDINATOR_LOST_S = 30.0
#: How long `status` waits for Kafka's figures (offsets, lag) before answering without them.
STATUS_KAFKA_S = 3.0

HealthSetter = Callable[[bool], Awaitable[None]]


class Subscription(abc.ABC):
    def __init__(self, config: SubscriptionConfig) -> None:
        self.config = config
        self.name = config.name
        #: What keeps the subscription from serving, by part ("group", "dead_letters"):
        #: health is SERVING exactly when this is empty.
        self.faults: dict[str, str] = {}
        self.stats = Stats()

    @property
    def serving(self) -> bool:
        return not self.faults

    async def _report(self, set_health: HealthSetter, part: str, fault: str | None) -> None:
        """One part's health; the subscription's health says whether every part is well."""
        if fault is None:
            self.faults.pop(part, None)
        else:
            self.faults[part] = fault
        await set_health(self.serving)

    @abc.abstractmethod
    def attach(self, request: pb.Open, peer: str) -> tuple[Dispatcher, Stream]:
        """A new app stream: which dispatcher serves it."""

    @abc.abstractmethod
    def detach(self, dispatcher: Dispatcher, stream: Stream) -> None: ...

    @abc.abstractmethod
    def dispatchers(self) -> list[Dispatcher]: ...

    @abc.abstractmethod
    async def run(self, set_health: HealthSetter) -> None:
        """Fetching and dispatching, until cancelled (shutdown cancels it first)."""

    async def settle(self, set_health: HealthSetter) -> None:
        """Work that settles records (dead-letter writes): keeps going through the
        shutdown grace, cancelled last."""
        await asyncio.Event().wait()

    @abc.abstractmethod
    async def stop(self) -> None:
        """After the shutdown grace: commit what is settled, leave, release connections."""

    @abc.abstractmethod
    async def status(self) -> pb.SubscriptionStatus: ...

    async def reset_offsets(self, request: pb.ResetOffsetsRequest) -> pb.ResetOffsetsResponse:
        raise OffsetsError(
            f"subscription {self.name!r} is a snapshot: it has no committed offsets",
            code="FAILED_PRECONDITION",
        )

    @property
    def unsettled(self) -> int:
        return sum(d.unsettled for d in self.dispatchers())

    def close(self, deadline_ms: int) -> None:
        """Shutdown begins: no more batches (streams are told their deadline); acks, dead
        letters and commits go on until `stop`."""
        for dispatcher in self.dispatchers():
            dispatcher.close(deadline_ms)

    def end_streams(self) -> None:
        for dispatcher in self.dispatchers():
            dispatcher.end_streams()

    def _base_status(self, state: str) -> pb.SubscriptionStatus:
        batches = records = size = streams = 0
        for dispatcher in self.dispatchers():
            b, r, s = dispatcher.in_flight
            batches, records, size = batches + b, records + r, size + s
            streams += len(dispatcher.streams)
        return pb.SubscriptionStatus(
            name=self.name,
            mode=MODES[self.config.mode],
            group_id=self.config.group_id or "",
            topics=self.config.topics,
            streams=streams,
            in_flight_batches=batches,
            in_flight_records=records,
            in_flight_bytes=size,
            serving=self.serving,
            state=state,
        )


class GroupSubscription(Subscription):
    """One consumer group membership shared by every stream of the subscription."""

    def __init__(
        self,
        config: SubscriptionConfig,
        client_kwargs: dict[str, Any],
        dead_letters: DeadLetterWriter | None,
        tracing: Tracing | None = None,
    ) -> None:
        super().__init__(config)
        self.ledger = Ledger()
        self.dead_letters = dead_letters
        self._client_kwargs = client_kwargs
        self.dispatcher = Dispatcher(
            config,
            self.ledger,
            group_id=config.group_id or "",
            dead_letters=dead_letters.submit if dead_letters else None,
            stats=self.stats,
            tracing=tracing,
        )
        self.consumer = GroupConsumer(config, self.dispatcher, self.ledger, client_kwargs)
        self._set_health: HealthSetter | None = None
        #: Writes ack outputs: in transactions with the commits, or idempotently.
        self.outputs: Transactions | OutputWriter
        if config.transactions.enabled:
            self.outputs = self.consumer.transactions = Transactions(
                config,
                self.ledger,
                client_kwargs,
                self.dispatcher,
                metadata_full=self.dispatcher.flight.metadata_full,
                on_fenced=self._fenced,
                report=self._transactions_health,
            )
        else:
            self.outputs = OutputWriter(client_kwargs, self.dispatcher)
        self.dispatcher.outputs = self.outputs.submit
        self.joined = False
        self.faults["group"] = "joining the group"
        self.stalls = Stalls(config.stall_after_ms / 1000)

    def attach(self, request: pb.Open, peer: str) -> tuple[Dispatcher, Stream]:
        return self.dispatcher, self.dispatcher.attach(request, peer)

    def detach(self, dispatcher: Dispatcher, stream: Stream) -> None:
        dispatcher.detach(stream)

    def dispatchers(self) -> list[Dispatcher]:
        return [self.dispatcher]

    async def run(self, set_health: HealthSetter) -> None:
        self._set_health = set_health
        await asyncio.gather(self.dispatcher.run(), self._membership(set_health))

    def _fenced(self, tp: tuple[str, int]) -> None:
        self.dispatcher.fenced(tp)
        self.consumer.rejoin()

    async def _transactions_health(self, fault: str | None) -> None:
        if self._set_health is not None:
            await self._report(self._set_health, "transactions", fault)

    async def settle(self, set_health: HealthSetter) -> None:
        if self.dead_letters is None:
            return await super().settle(set_health)

        writer = self.dead_letters

        async def dlq_health(ok: bool) -> None:
            fault = None
            if not ok:
                stuck = ", ".join(
                    f"{f.letter.pending.tp[0]}[{f.letter.pending.tp[1]}]@"
                    f"{f.letter.pending.offset} ({f.cause}{': ' + f.missing if f.missing else ''})"
                    for f in writer.failing[:5]
                )
                fault = f"dead-letter writes failing: {stuck or 'unconfirmed'}"
            await self._report(set_health, "dead_letters", fault)

        await writer.run(self.dispatcher.dead_lettered, dlq_health)

    def close(self, deadline_ms: int) -> None:
        super().close(deadline_ms)
        self.consumer.stop_fetching()

    async def _membership(self, set_health: HealthSetter) -> None:
        """Group membership follows the app: joined while a stream is attached (and at
        start), left after `detach_timeout_ms` without one so other pods take the
        partitions, joined again when a stream attaches.

        Fetching and committing are supervised: if either fails, this fails (and the daemon
        exits 1 so it is restarted) instead of serving on with nothing fetched or committed.
        """
        dispatcher = self.dispatcher
        while True:
            await self._join(set_health)
            try:
                async with asyncio.TaskGroup() as work:
                    fetching = work.create_task(
                        self.consumer.run(
                            report=lambda fault: self._report(set_health, "fetch", fault),
                            denied=lambda fault: self._report(set_health, "permissions", fault),
                        )
                    )
                    committing = work.create_task(self.consumer.commit_loop())
                    watching = work.create_task(self._watch_stalls())
                    coordinator = work.create_task(self._watch_coordinator(set_health))
                    await self._wait_detached(self.config.detach_timeout_ms / 1000)
                    fetching.cancel()
                    committing.cancel()
                    watching.cancel()
                    coordinator.cancel()
            except BaseExceptionGroup as failed:
                await self._report(set_health, "group", f"failed: {failed.exceptions[0]!r}")
                # The first failure, as itself: the daemon logs it and exits 1.
                raise failed.exceptions[0] from failed
            await self._report(set_health, "coordinator", None)  # out of the group: moot
            await self.consumer.stop()
            self.joined = False
            log.info(
                "no stream attached: left the group until one attaches",
                extra={
                    "subscription": self.name,
                    "detach_timeout_ms": self.config.detach_timeout_ms,
                },
            )
            while not dispatcher.streams:
                dispatcher.streams_changed.clear()
                await dispatcher.streams_changed.wait()

    async def _watch_coordinator(self, set_health: HealthSetter) -> None:
        """NOT_SERVING while the group's coordinator stays unknown (`COORDINATOR_LOST_S`):
        aiokafka retries quietly and fetches nothing, so without this a subscription whose
        brokers are all gone would say SERVING to the app, the kubelet and the alerts."""
        lost_since: float | None = None
        asked = 0.0
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            if self.consumer.coordinator_known():
                if lost_since is not None and "coordinator" in self.faults:
                    log.info(
                        "the group's coordinator answers again",
                        extra={"subscription": self.name, "lost_s": round(now - lost_since, 1)},
                    )
                    await self._report(set_health, "coordinator", None)
                lost_since = None
                continue
            lost_since = lost_since or now
            if now - lost_since >= COORDINATOR_LOST_S and now - asked >= COORDINATOR_LOST_S:
                # Asked again every so often: brokers that come back may refuse the sign-in
                # (credentials revoked, a policy changed), which asking also re-signs for.
                asked = now
                why, fields = await unreachable(self._client_kwargs)
                fault = f"no coordinator for the group for {COORDINATOR_LOST_S:g} s: {why}"
                if self.faults.get("coordinator") != fault:
                    log.error(
                        f"{fault}; still retrying",
                        extra={
                            "subscription": self.name,
                            "group_id": self.config.group_id,
                            **fields,
                        },
                    )
                    await self._report(set_health, "coordinator", fault)

    async def _watch_stalls(self) -> None:
        """Checks every partition's commit a few times per `stall_after_ms` (see stalls.py)."""
        interval = min(1.0, self.stalls.after_s / 4)
        while True:
            await asyncio.sleep(interval)
            await self._check_stalls(time.monotonic())

    async def _check_stalls(self, now: float) -> None:
        dispatcher, consumer = self.dispatcher, self.consumer.consumer
        assigned = dispatcher.assigned
        self.stalls.keep(assigned)
        for tp in sorted(assigned):
            ledger = dispatcher.ledger.partition(tp)
            highwater = consumer.highwater(TopicPartition(*tp))
            if ledger is not None:
                commit = ledger.commit_offset()
                owed = ledger.unsettled > 0
            else:  # nothing fetched in this assignment yet
                commit = await consumer.position(TopicPartition(*tp))
                owed = False
            owed = owed or (highwater is not None and highwater > commit)
            stall = self.stalls.check(tp, commit, owed, now)
            if stall is not None:
                log.warning(
                    "partition stalled: its commit has not moved while records are owed",
                    extra={
                        "subscription": self.name,
                        "topic": tp[0],
                        "partition": tp[1],
                        "offset": stall.offset,
                        "record": dispatcher.flight.whereabouts(tp, stall.offset),
                        "stalled_s": round(now - stall.since, 1),
                        "lag": None if highwater is None else max(highwater - commit, 0),
                    },
                )

    def stalled(self, tp: tuple[str, int]) -> str:
        """Status words for a stalled partition ("" when it is not)."""
        stall = self.stalls.stalled.get(tp)
        if stall is None:
            return ""
        where = self.dispatcher.flight.whereabouts(tp, stall.offset)
        age = time.monotonic() - stall.since
        return f"commit at offset {stall.offset} has not moved for {age:.0f}s; the record: {where}"

    async def _wait_detached(self, timeout_s: float) -> None:
        """Returns once no stream has been attached for `timeout_s`."""
        changed = self.dispatcher.streams_changed
        while True:
            changed.clear()
            if self.dispatcher.streams:
                await changed.wait()
                continue
            try:
                async with asyncio.timeout(timeout_s):
                    await changed.wait()
            except TimeoutError:
                return

    async def _join_failure(self, exc: Exception) -> tuple[str, dict[str, object]]:
        """What kept the group from being joined, for the status and the log line: aiokafka's
        "Unable to bootstrap" says neither which setting to look at nor whether the brokers
        answered at all, so a refused sign-in is told apart (by asking again) and named."""
        if isinstance(exc, KafkaConnectionError):
            return await connection_failure(exc, self._client_kwargs)
        if isinstance(exc, LookupError | DeadLetterError | KafkaError):
            return str(exc), {}  # KafkaError's own str() starts with its class name
        return f"{type(exc).__name__}: {exc}", {}

    async def _join(self, set_health: HealthSetter) -> None:
        """Joins the group, retrying while the brokers are unreachable.

        A join the broker refuses for want of a permission (no AlterGroup, DescribeGroup or
        DescribeTopic) is retried too, every `DENIED_RETRY_S`, with an error naming the IAM
        action and ARN to grant, and health NOT_SERVING meanwhile: the sidecar stays up, so its
        other subscriptions keep serving and a fixed policy takes effect without a restart
        (a crash loop would say no more than the log and the health status already do)."""
        backoff = 1.0
        while True:
            try:
                if self.dead_letters is not None and not self.dead_letters.checked:
                    await self.dead_letters.start()
                if missing := await self.consumer.missing_topics():
                    raise LookupError(
                        f"subscription {self.name!r}: topics {missing} do not exist (the "
                        "sidecar never creates topics); waiting for them"
                    )
                await self.consumer.start()
                break
            except PermissionDenied as denied:
                await self._report(set_health, "group", f"cannot join the group: {denied}")
                log.error(
                    f"subscription {self.name!r} cannot join group {self.config.group_id!r}: "
                    f"{denied}; retrying in {DENIED_RETRY_S:g} s",
                    extra={
                        "subscription": self.name,
                        "group_id": self.config.group_id,
                        "topics": self.config.topics,
                        "error": repr(denied.__cause__ or denied),
                        "retry_in_s": DENIED_RETRY_S,
                        **denied.fields(),
                    },
                )
                await asyncio.sleep(DENIED_RETRY_S)
                backoff = 1.0
            except Exception as exc:
                why, fields = await self._join_failure(exc)
                await self._report(set_health, "group", f"cannot join the group: {why}")
                log.error(
                    f"cannot join the group: {why}; retrying",
                    extra={
                        "subscription": self.name,
                        "error": repr(exc),
                        "retry_in_s": backoff,
                        **fields,
                    },
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
        self.joined = True
        await self._report(set_health, "group", None)
        log.info(
            "consuming",
            extra={
                "subscription": self.name,
                "group_id": self.config.group_id,
                "topics": self.config.topics,
            },
        )

    async def stop(self) -> None:
        if isinstance(self.outputs, OutputWriter):
            # Writes under way settle their records, which the final commit then covers.
            with contextlib.suppress(Exception):
                await self.outputs.stop()
        with contextlib.suppress(Exception):
            await self.consumer.stop()
        if self.dead_letters is not None:
            with contextlib.suppress(Exception):
                await self.dead_letters.stop()

    async def status(self) -> pb.SubscriptionStatus:
        if self.faults:  # first: a join that keeps failing is not idleness
            state = "; ".join(self.faults.values())
        elif not self.joined:
            state = "idle: left the group until a stream attaches"
        else:
            state = "consuming" if self.dispatcher.streams else "waiting for a stream"
        status = self._base_status(state)
        consumer = self.consumer.consumer
        tps = [TopicPartition(t, p) for t, p in sorted(self.dispatcher.assigned)]
        if not (self.joined and tps):
            return status
        # Kafka's figures, if Kafka answers in time: a status that hangs while the brokers
        # are gone would fail the operator exactly when it is needed.
        try:
            async with asyncio.timeout(STATUS_KAFKA_S):
                ends = await consumer.end_offsets(tps)
                done = await committed(consumer, tps)
                positions = {tp: await consumer.position(tp) for tp in tps}
        except (TimeoutError, KafkaError) as exc:
            why = f"Kafka did not answer within {STATUS_KAFKA_S:g} s"
            status.state += (
                f"; offsets and lag unknown ({why if isinstance(exc, TimeoutError) else exc})"
            )
            return status
        for tp in tps:
            position = positions[tp]
            base = done[tp] if done[tp] >= 0 else position
            status.partitions.append(
                pb.PartitionStatus(
                    topic=tp.topic,
                    partition=tp.partition,
                    committed_offset=done[tp],
                    position=position,
                    high_watermark=ends[tp],
                    lag=max(ends[tp] - base, 0),
                    in_flight_records=self.dispatcher.unsettled_in({(tp.topic, tp.partition)}),
                    stalled=self.stalled((tp.topic, tp.partition)),
                )
            )
        return status

    async def reset_offsets(self, request: pb.ResetOffsetsRequest) -> pb.ResetOffsetsResponse:
        """Live reset: the partitions this member owns are sought and committed (what is in
        flight is dropped; late acks are rejected); other members' partitions are reported,
        not touched."""
        if not self.joined:
            raise OffsetsError(
                f"subscription {self.name!r} is not in its group right now (no stream "
                "attached); reset it offline with `kafka-sidecar reset-offsets --group`",
                code="FAILED_PRECONDITION",
            )
        consumer = self.consumer.consumer
        everything = {
            TopicPartition(topic, partition)
            for topic in self.config.topics
            for partition in consumer.partitions_for_topic(topic) or ()
        }
        chosen = selected_partitions(request, self.config.topics, everything)
        owned = sorted(tp for tp in chosen if (tp.topic, tp.partition) in self.dispatcher.assigned)
        targets = await target_offsets(consumer, owned, request)
        old = await committed(consumer, owned)
        if owned and not request.dry_run:
            self.dispatcher.reset((tp.topic, tp.partition) for tp in owned)
            for tp in owned:
                consumer.seek(tp, targets[tp])
            await consumer.commit({tp: OffsetAndMetadata(targets[tp], "") for tp in owned})
            log.info(
                "offsets reset",
                extra={
                    "subscription": self.name,
                    "offsets": {f"{tp.topic}:{tp.partition}": targets[tp] for tp in owned},
                },
            )
        return pb.ResetOffsetsResponse(
            changes=[Change(tp.topic, tp.partition, old[tp], targets[tp]).to_pb() for tp in owned],
            not_owned=[
                pb.TopicPartition(topic=tp.topic, partition=tp.partition)
                for tp in sorted(chosen - set(owned))
            ],
        )


class SnapshotSubscription(Subscription):
    """Every stream gets its own reader from the beginning of every partition."""

    def __init__(
        self,
        config: SubscriptionConfig,
        client_kwargs: dict[str, Any],
        tracing: Tracing | None = None,
    ) -> None:
        super().__init__(config)
        self._client_kwargs = client_kwargs
        self._tracing = tracing
        self._readers: dict[Stream, tuple[SnapshotReader, asyncio.Task[Any]]] = {}
        self._stream_ids = itertools.count(1)

    def attach(self, request: pb.Open, peer: str) -> tuple[Dispatcher, Stream]:
        dispatcher = Dispatcher(
            self.config,
            Ledger(),
            stats=self.stats,
            tracing=self._tracing,
            stream_ids=self._stream_ids,
        )
        stream = dispatcher.attach(request, peer)
        reader = SnapshotReader(self.config, dispatcher, stream, self._client_kwargs)
        task = asyncio.create_task(self._read(reader))
        self._readers[stream] = (reader, task)
        return dispatcher, stream

    async def _read(self, reader: SnapshotReader) -> None:
        """The stream's reader and dispatcher live and die together: a failed read ends the
        stream (the app reconnects and reads afresh) and leaves nothing running behind."""
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(reader.run())
                tasks.create_task(reader.dispatcher.run())
        except* Exception:
            log.exception(
                "snapshot read failed; ending the stream",
                extra={"subscription": self.name, "stream": reader.stream.id},
            )
            reader.stream.outbox.put_nowait(None)

    def detach(self, dispatcher: Dispatcher, stream: Stream) -> None:
        dispatcher.detach(stream)
        entry = self._readers.pop(stream, None)
        if entry is not None:
            entry[1].cancel()

    def dispatchers(self) -> list[Dispatcher]:
        return [reader.dispatcher for reader, _ in self._readers.values()]

    async def run(self, set_health: HealthSetter) -> None:
        await set_health(self.serving)
        await asyncio.Event().wait()

    async def stop(self) -> None:
        tasks = [task for _, task in self._readers.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def status(self) -> pb.SubscriptionStatus:
        readers = [reader for reader, _ in self._readers.values()]
        status = self._base_status("reading" if readers else "waiting for a stream")
        status.caught_up = bool(readers) and all(r.caught_up for r in readers)
        return status
