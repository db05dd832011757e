"""The Kafka side of a group subscription: a thin shell around AIOKafkaConsumer.

It fetches into the dispatcher, pauses partitions whose backlog is full while it keeps
polling (so a slow app never costs the group membership: aiokafka's `getmany` with paused
partitions still resets the poll-interval clock), and commits what the ledger says is safe.
`enable_auto_commit` stays off: aiokafka would commit what it returned, not what was acked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.client import AIOKafkaClient
from aiokafka.errors import CommitFailedError, KafkaError
from aiokafka.structs import OffsetAndMetadata

from sidecar import permissions, tap
from sidecar.config import SubscriptionConfig
from sidecar.dispatcher import Dispatcher
from sidecar.ledger import Ledger, decode_settled
from sidecar.outputs import Transactions

log = logging.getLogger("sidecar.consumer")

#: How long the commit on revoke may take (after the revoke grace).
REVOKE_COMMIT_S = 15.0
#: A poll refused for want of a permission is retried after `DENIED_POLL_S` (aiokafka
#: fetches again, and warns again, only once its error was raised), logged again after
#: `DENIED_LOG_S`, and counts as fixed once no poll was refused for `DENIED_CLEAR_S`.
DENIED_POLL_S = 5.0
DENIED_LOG_S = 30.0
DENIED_CLEAR_S = 2 * DENIED_POLL_S


async def close_consumer(consumer: AIOKafkaConsumer) -> None:
    """`AIOKafkaConsumer.stop()`, finished even when aiokafka trips over itself.

    aiokafka 0.14's fetcher cleanup awaits fetch tasks it has just cancelled, so `stop()`
    raises CancelledError whenever a fetch was in its retry backoff, e.g. right after MSK
    ended a session. The group was already left by then; only the client's connections are
    left open, so close them, unless this task itself is being cancelled.
    """
    try:
        await consumer.stop()
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        await consumer._client.close()


def transcoding_consumer(*, keys: bool = False, **kwargs: Any) -> AIOKafkaConsumer:
    """An AIOKafkaConsumer whose `getmany` returns, per partition, the `Transcoded` records
    of each fetch (and `tap.Corrupt` where a batch cannot be read) instead of a
    ConsumerRecord per record: see sidecar/tap.py. With `keys`, each record's key too."""
    tap.install()
    deserializer = tap.TRANSCODE_KEYS if keys else tap.TRANSCODE
    return AIOKafkaConsumer(key_deserializer=deserializer, **kwargs)


@dataclass(slots=True)
class ConsumerStats:
    """Running totals for metrics."""

    commits: int = 0
    commit_failures: int = 0
    commit_seconds: float = 0.0
    #: Wall-clock time of the last successful commit (0: none yet).
    last_commit: float = 0.0
    rebalances: int = 0


class Unreadable:
    """Partitions stuck at a record batch that cannot be read, for health to tell.

    The tap (sidecar/tap.py) hands over what precedes such a batch and a `tap.Corrupt` for
    it, and the position stays there: every fetch meets it again, so the partition delivers
    nothing until the log is repaired or its offset reset past the batch. A partition leaves
    this set when a fetch of it reads again, or when it is no longer assigned.
    """

    def __init__(self) -> None:
        self._at: dict[tuple[str, int], tap.Corrupt] = {}

    def update(
        self, fetched: Mapping[tuple[str, int], list[Any]], assigned: set[tuple[str, int]]
    ) -> bool:
        """Takes in one poll's items; returns whether the set of stuck partitions changed."""
        before = dict(self._at)
        for tp, items in fetched.items():
            for item in items:
                if isinstance(item, tap.Corrupt):
                    self._at[tp] = item
                else:
                    self._at.pop(tp, None)
        for tp in [tp for tp in self._at if tp not in assigned]:
            del self._at[tp]
        return self._at.keys() != before.keys()

    @property
    def fault(self) -> str | None:
        if not self._at:
            return None
        stuck = ", ".join(
            f"{t}[{p}]@{c.offset} ({c.error})" for (t, p), c in sorted(self._at.items())[:5]
        )
        return f"record batches cannot be read: {stuck}"


@dataclass(slots=True, frozen=True)
class _Refused:
    """Polls are being refused for want of a permission: what is missing, when it was last
    refused and last logged (monotonic)."""

    text: str
    last: float
    logged: float


class Fetcher:
    """Polls a consumer into a dispatcher, with pause-while-polling backpressure.

    The state machine says when a partition is paused (`InFlight.backpressure`). Polling goes
    on with everything paused (it keeps the group membership: aiokafka's `getmany` resets the
    poll-interval clock either way), and memory stays bounded by those thresholds and the
    streams' windows, not by the topic's backlog.
    """

    def __init__(
        self, consumer: AIOKafkaConsumer, dispatcher: Dispatcher, config: SubscriptionConfig
    ) -> None:
        self.consumer = consumer
        self.dispatcher = dispatcher
        self.config = config

    async def run(
        self,
        stop: Callable[[], bool] = lambda: False,
        after_poll: Callable[[], Awaitable[None]] | None = None,
        report: Callable[[str | None], Awaitable[None]] | None = None,
        denied: Callable[[str | None], Awaitable[None]] | None = None,
    ) -> None:
        """`report` is told when partitions get stuck at an unreadable batch (a fault for
        health) and when none is any more (None); `denied` when the broker refuses fetches
        (or the group's requests) for want of a permission, and when it no longer does."""
        resumer = asyncio.create_task(self._resume_on_room())
        unreadable = Unreadable()
        refused: _Refused | None = None
        if report is not None:
            await report(None)
        if denied is not None:
            await denied(None)
        try:
            while not stop():
                try:
                    # One item per partition's fetch: the fetch size bounds it, and the
                    # backlog's thresholds pause partitions.
                    fetched = await self.consumer.getmany(timeout_ms=200)
                except KafkaError as exc:
                    if permissions.is_denial(exc):
                        refused = await self._refused(exc, refused, denied)
                        await asyncio.sleep(DENIED_POLL_S)
                        continue
                    log.warning(
                        "fetch failed; retrying",
                        extra={"subscription": self.config.name, "error": repr(exc)},
                    )
                    await asyncio.sleep(1)
                    continue
                if refused is not None and (
                    fetched or time.monotonic() - refused.last > DENIED_CLEAR_S
                ):
                    refused = None
                    log.info("fetching is allowed again", extra={"subscription": self.config.name})
                    if denied is not None:
                        await denied(None)
                corrupt = False
                for tp, items in fetched.items():
                    for item in items:
                        if isinstance(item, tap.Corrupt):
                            corrupt = True
                            self._corrupt(item)
                        else:
                            self.dispatcher.add((tp.topic, tp.partition), item)
                self.apply()
                if corrupt or unreadable.fault is not None:  # else nothing is or was stuck
                    assigned = {(tp.topic, tp.partition) for tp in self.consumer.assignment()}
                    polled = {(tp.topic, tp.partition): items for tp, items in fetched.items()}
                    if unreadable.update(polled, assigned) and report is not None:
                        await report(unreadable.fault)
                if corrupt:
                    # The position stays at the bad batch: the next fetch meets it again.
                    await asyncio.sleep(1)
                if after_poll is not None:
                    await after_poll()
        finally:
            resumer.cancel()

    async def _refused(
        self,
        exc: KafkaError,
        refused: _Refused | None,
        denied: Callable[[str | None], Awaitable[None]] | None,
    ) -> _Refused:
        """A poll the broker refused for want of a permission: aiokafka raises it from every
        poll while it lasts (fetches: ReadData; the group's heartbeats and rejoins:
        AlterGroup), and keeps retrying. Said at error level (again every `DENIED_LOG_S`),
        and to health: records are not flowing and will not until the policy changes."""
        group = self.config.group_id or ""
        if permissions.denial_class(exc) == "GroupAuthorizationFailedError":
            missing = [permissions.join_group(group)]
        else:
            topics = permissions.denied_topics(exc) or list(self.config.topics)
            missing = [permissions.read_topic(topic) for topic in topics]
        problem = permissions.PermissionDenied(missing)
        now = time.monotonic()
        if refused is None or refused.text != str(problem) or now - refused.logged > DENIED_LOG_S:
            log.error(
                f"subscription {self.config.name!r} cannot fetch: {problem}; retrying",
                extra={
                    "subscription": self.config.name,
                    "group_id": group or None,
                    "topics": self.config.topics,
                    "error": repr(exc),
                    **problem.fields(),
                },
            )
            logged = now
        else:
            logged = refused.logged
        if denied is not None and (refused is None or refused.text != str(problem)):
            await denied(f"cannot fetch: {problem}")
        return _Refused(str(problem), now, logged)

    def _corrupt(self, item: tap.Corrupt) -> None:
        log.error(
            "a record batch cannot be read (bad CRC, malformed or undecompressable); the "
            "partition is stuck at it until the log is repaired or the offset reset past it",
            extra={
                "subscription": self.config.name,
                "topic": item.tp[0],
                "partition": item.tp[1],
                "offset": item.offset,
                "error": repr(item.error),
            },
        )

    async def _resume_on_room(self) -> None:
        """Resumes as soon as batches went out, not at the next poll: a poll with every
        partition paused only returns after its timeout."""
        drained = self.dispatcher.drained
        while True:
            await drained.wait()
            drained.clear()
            if self.consumer.paused():
                self.apply()

    def apply(self) -> None:
        """Pauses and resumes partitions as the state machine says. The paused set is read
        from the consumer each time, never kept here: `assign()` (snapshot readers) resets
        aiokafka's pause state, and a stale copy would leave a partition unpaused for good."""
        paused_now = self.consumer.paused()
        pause: list[TopicPartition] = []
        resume: list[TopicPartition] = []
        backpressure = self.dispatcher.backpressure
        for tp in self.consumer.assignment():
            paused = tp in paused_now
            if backpressure((tp.topic, tp.partition), paused) != paused:
                (resume if paused else pause).append(tp)
        if pause:
            self.consumer.pause(*pause)
        if resume:
            self.consumer.resume(*resume)


class GroupConsumer:
    """Fetch → dispatcher, ledger → commits, for one `mode: group` subscription."""

    def __init__(
        self,
        config: SubscriptionConfig,
        dispatcher: Dispatcher,
        ledger: Ledger,
        client_kwargs: dict[str, Any],
    ) -> None:
        self.config = config
        self.dispatcher = dispatcher
        self.ledger = ledger
        self._client_kwargs = client_kwargs
        self.stats = ConsumerStats()
        self._stopping = False
        self._fetching = True
        self.consumer = self._new_consumer()
        #: With `transactions.enabled`: commits go through the partitions' transactions.
        self.transactions: Transactions | None = None

    def _new_consumer(self) -> AIOKafkaConsumer:
        consumer = self.config.consumer
        return transcoding_consumer(
            keys=self.config.ordering == "key",
            group_id=self.config.group_id,
            enable_auto_commit=False,
            auto_offset_reset=consumer.auto_offset_reset,
            session_timeout_ms=consumer.session_timeout_ms,
            heartbeat_interval_ms=consumer.heartbeat_interval_ms,
            max_poll_interval_ms=consumer.max_poll_interval_ms,
            # The revoke grace runs inside the rebalance, so the broker must wait for it.
            rebalance_timeout_ms=consumer.rebalance_timeout_ms
            or max(consumer.session_timeout_ms, self.config.revoke_grace_ms + 5000),
            fetch_max_bytes=consumer.fetch_max_bytes,
            max_partition_fetch_bytes=consumer.max_partition_fetch_bytes,
            group_instance_id=consumer.group_instance_id,
            isolation_level=consumer.isolation_level,
            **self._client_kwargs,
        )

    async def missing_topics(self) -> list[str]:
        """Subscribed topics the cluster does not have. aiokafka would wait a request timeout
        and fail with a bare UnknownTopicOrPartitionError; this names them at once. Topics the
        principal may not describe look just the same in a listing: those raise
        `PermissionDenied` (DescribeTopic) instead."""
        client = AIOKafkaClient(**self._client_kwargs)
        try:
            await client.bootstrap()
            metadata = await client.fetch_all_metadata()
            missing = [topic for topic in self.config.topics if topic not in metadata.topics()]
            hidden = await permissions.undescribable(client, missing) if missing else []
        finally:
            await client.close()
        if hidden:
            raise permissions.PermissionDenied(permissions.describe_topic(t) for t in hidden)
        return missing

    async def start(self) -> None:
        """Joins the group. A consumer that left (or failed to start) is replaced: aiokafka
        consumers cannot be restarted."""
        if self.consumer._closed:
            self.consumer = self._new_consumer()
        self._stopping = False
        self._fetching = True
        self.consumer.subscribe(self.config.topics, listener=_Rebalance(self))
        try:
            await self.consumer.start()
        except BaseException as exc:
            denied = self._denied(exc)
            await close_consumer(self.consumer)
            if denied is not None:
                raise denied from exc
            raise

    def _denied(self, exc: BaseException) -> permissions.PermissionDenied | None:
        """What joining lacks, if the broker refused it: aiokafka's GroupAuthorizationFailedError
        does not say which request failed, but the coordinator does: not found yet means
        FindCoordinator was refused (DescribeGroup), else the JoinGroup or SyncGroup was
        (AlterGroup). A refused metadata request is DescribeTopic on the topics."""
        kind = permissions.denial_class(exc)
        group = self.config.group_id or ""
        if kind == "GroupAuthorizationFailedError":
            coordinator = self.consumer._coordinator
            if coordinator is None or coordinator.coordinator_id is None:
                return permissions.PermissionDenied([permissions.describe_group(group)])
            return permissions.PermissionDenied([permissions.join_group(group)])
        if kind == "TopicAuthorizationFailedError":
            topics = permissions.denied_topics(exc) or list(self.config.topics)
            return permissions.PermissionDenied(permissions.describe_topic(t) for t in topics)
        return None

    async def run(
        self,
        report: Callable[[str | None], Awaitable[None]] | None = None,
        denied: Callable[[str | None], Awaitable[None]] | None = None,
    ) -> None:
        """Fetches until stopped; `report` hears of partitions stuck at unreadable batches,
        `denied` of polls refused for want of a permission (see `Fetcher.run`)."""
        await Fetcher(self.consumer, self.dispatcher, self.config).run(
            lambda: self._stopping or not self._fetching, report=report, denied=denied
        )

    def stop_fetching(self) -> None:
        """Shutdown grace: fetch nothing more, but keep committing what the app settles, so a
        kill at the end of the grace replays only what was never acked."""
        self._fetching = False

    async def commit_loop(self) -> None:
        interval = self.config.commit_interval_ms / 1000
        while not self._stopping:
            await asyncio.sleep(interval)
            await self.commit()

    async def commit(self, only: set[tuple[str, int]] | None = None) -> None:
        """Commits every partition whose lowest unsettled offset (or the settled records
        above it, which ride along in the metadata so the next owner skips them) moved."""
        if self.transactions is not None:
            await self.transactions.commit(only)
            return
        pending = self.ledger.pending_commits()
        if only is not None:
            pending = {tp: offset for tp, offset in pending.items() if tp in only}
        if not pending:
            return
        offsets = {}
        # What the metadata describes, as of now: acks during the round trip are news.
        above: dict[tuple[str, int], int] = {}
        for tp in pending:
            ledger = self.ledger.partition(tp)
            assert ledger is not None  # pending_commits names assigned partitions only
            point = ledger.commit_point()
            # Ranges that did not fit would be redelivered after a crash: fetching that
            # partition waits until they fit again.
            self.dispatcher.flight.metadata_full(tp, not point.complete)
            above[tp] = point.settled_above
            offsets[TopicPartition(*tp)] = OffsetAndMetadata(point.offset, point.metadata)
        started = time.perf_counter()
        try:
            await self.consumer.commit(offsets)
        except (CommitFailedError, KafkaError) as exc:
            # Rebalancing or a broker hiccup: the ledger still holds it; next tick retries.
            self.stats.commit_failures += 1
            if permissions.is_denial(exc):
                # OffsetCommit needs READ on the group and on each topic.
                self._commit_denied(exc, {tp[0] for tp in pending})
                return
            log.info(
                "commit deferred",
                extra={"subscription": self.config.name, "error": repr(exc)},
            )
            return
        self.stats.commits += 1
        self.stats.commit_seconds += time.perf_counter() - started
        self.stats.last_commit = time.time()
        self.ledger.mark_committed(pending, above)
        log.debug(
            "committed",
            extra={
                "subscription": self.config.name,
                "offsets": {f"{t}:{p}": o for (t, p), o in pending.items()},
            },
        )

    def _commit_denied(self, exc: BaseException, topics: set[str]) -> None:
        group = self.config.group_id or ""
        if permissions.denial_class(exc) == "GroupAuthorizationFailedError":
            problem = permissions.PermissionDenied([permissions.join_group(group)])
        else:
            named = permissions.denied_topics(exc) or sorted(topics)
            problem = permissions.PermissionDenied(permissions.read_topic(t) for t in named)
        log.error(
            f"subscription {self.config.name!r} cannot commit: {problem}; the records stay "
            "uncommitted (a restart would deliver them again), retrying",
            extra={
                "subscription": self.config.name,
                "group_id": group,
                "error": repr(exc),
                **problem.fields(),
            },
        )

    async def stop(self) -> None:
        """Final commit, then leave the group so the partitions move on at once. What was
        not settled is dropped here and redelivered by the partitions' next owner."""
        self._stopping = True
        with contextlib.suppress(Exception):
            await self.commit()
        if self.transactions is not None:
            await self.transactions.stop()
        await close_consumer(self.consumer)
        self.dispatcher.revoke(self.dispatcher.assigned)

    def coordinator_known(self) -> bool:
        """Whether aiokafka knows the group's coordinator: it forgets it when a heartbeat or
        commit fails, and finds the new one within seconds when a broker restarts or fails
        over; unknown for long, no broker answers."""
        coordinator = self.consumer._coordinator
        return coordinator is not None and coordinator.coordinator_id is not None

    def rejoin(self) -> None:
        """Asks for a new group generation (a partition's transactional producer was
        fenced: a zombie learns it lost its partitions, a live member gets them back)."""
        self.consumer._coordinator.request_rejoin()

    async def take_up(self, tps: list[tuple[str, int]]) -> None:
        """Delivery of newly assigned partitions begins, from their committed offsets: what
        is settled above them (the commit's metadata) is skipped when fetched again.

        With transactions this runs once the partition's producer has fenced the previous
        owner's, so the commit read here is final, and it seeks there: aiokafka read one at
        assignment already, which may predate the previous owner's last transaction."""
        assigned = [TopicPartition(*tp) for tp in tps]
        if self.transactions is None:
            # Before any await: records fetched from now on are tracked.
            self.dispatcher.assign(tps)
        try:
            committed = await self.consumer._coordinator.fetch_committed_offsets(assigned)
        except KafkaError as exc:
            if self.transactions is not None:
                raise  # the position could be stale: must not deliver
            # Only an optimisation is lost: everything from the committed offset is redelivered.
            log.warning(
                "could not read commit metadata; settled records above it will be redelivered",
                extra={"subscription": self.config.name, "error": repr(exc)},
            )
            committed = {}
        if self.transactions is not None:
            # Records fetched before this (from the older position) were not tracked, and
            # both the seek and the reset drop what aiokafka holds of them.
            fetcher = self.consumer._fetcher
            for tp in assigned:
                meta = committed.get(tp)
                if meta is not None and meta.offset >= 0:
                    self.consumer.seek(tp, meta.offset)
                else:
                    reset = fetcher.request_offset_reset([tp], fetcher._default_reset_strategy)
                    reset.add_done_callback(lambda f: f.cancelled() or f.exception())
            self.dispatcher.assign(tps)
        for tp, meta in committed.items():
            if ranges := decode_settled(meta.offset, meta.metadata or ""):
                self.dispatcher.skip((tp.topic, tp.partition), ranges)


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, owner: GroupConsumer) -> None:
        self._owner = owner

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        """Stop sending the partitions, give the app `revoke_grace_ms` to settle what it holds
        (heartbeats go on meanwhile), commit, then let the rest go to the next owner. The
        partitions are let go whatever happens on the way: a partition left half-revoked
        would get no deliveries and no commits for as long as the process lives."""
        owner = self._owner
        tps = {(tp.topic, tp.partition) for tp in revoked}
        if not tps:
            return
        owner.stats.rebalances += 1
        owner.dispatcher.begin_revoke(tps)
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + owner.config.revoke_grace_ms / 1000
            while owner.dispatcher.unsettled_in(tps) and loop.time() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            try:
                # Bounded: a commit stuck on an unreachable coordinator must not hold the
                # rebalance; what it did not commit, the next owner delivers again.
                async with asyncio.timeout(REVOKE_COMMIT_S):
                    await owner.commit(only=tps)
            except TimeoutError:
                log.warning(
                    "the commit on revoke did not finish in time; the next owner redelivers "
                    "what it did not commit",
                    extra={"subscription": owner.config.name, "timeout_s": REVOKE_COMMIT_S},
                )
        finally:
            owner.dispatcher.revoke(tps)
            if owner.transactions is not None:
                await owner.transactions.close(tps)
        log.info(
            "partitions revoked",
            extra={"subscription": owner.config.name, "partitions": sorted(tps)},
        )

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        owner = self._owner
        tps = sorted((tp.topic, tp.partition) for tp in assigned)
        if owner.transactions is not None:
            await owner.transactions.open(tps, owner.take_up)
        else:
            await owner.take_up(tps)
        log.info(
            "partitions assigned",
            extra={"subscription": owner.config.name, "partitions": tps},
        )
