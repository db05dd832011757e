"""Ack outputs: the records an app's ack asks the sidecar to produce (consume-transform-produce).

An ack with outputs stages its records in the state machine (`inflight.Staged`): they are
settled only once the outputs are written, so a crash before that redelivers them and nothing
is committed past an output that was not written. Two writers:

- `OutputWriter` (transactions off): one idempotent producer (acks=all); an ack's records
  settle once the broker confirmed every one of its outputs. At least once: a crash between
  that and the next commit redelivers the records, and the app writes their outputs again.
- `Transactions` (transactions on): each ack's outputs are written in a Kafka transaction
  together with the commit of its partition's offsets, so a `read_committed` reader sees each
  output exactly once. The commit's metadata names the records settled above the commit
  point (`ledger.encode_settled`), so a new owner skips them rather than having their outputs
  written twice; a commit whose metadata cannot hold them all waits until it can.

Why one transactional producer per input partition: aiokafka 0.14 speaks TxnOffsetCommit v0
only, which carries no group generation or member id, so the KIP-447 scheme (one producer per
process, the group coordinator refusing offsets from an old generation) is out of reach. The
older scheme is not: the transactional id names the input partition
(`<prefix>.<group>.<topic>.<partition>`), so whoever owns the partition uses the same id, and
the new owner's InitProducerId bumps its epoch: the broker aborts what the previous owner left
open and refuses whatever that producer sends afterwards (ProducerFenced). The new owner reads
the committed offset only after that (aiokafka fetches one at assignment concurrently, which
may predate the previous owner's last transaction) and seeks there: see `Transactions.open`.

A transaction runs as soon as its partition has staged acks and none is under way for it (a
group commit: under load each transaction carries what accumulated during the previous one),
and otherwise every `commit_interval_ms` for offsets alone. Its outcome goes back to the state
machine: committed → the records are settled; aborted → the records whose outputs the broker
refused are retried as if nacked (dead-lettered once their attempts run out), the others are
delivered again at once; fenced → the partition gets no more deliveries and the member rejoins
its group (a zombie learns it lost the partition; a live member gets it back with a fresh
producer, after reading the commit again).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError, UnknownTopicOrPartitionError
from aiokafka.structs import OffsetAndMetadata

from kafkasidecar.v1 import consumer_pb2 as pb
from sidecar import permissions
from sidecar.config import SubscriptionConfig
from sidecar.deadletters import classify
from sidecar.inflight import Staged
from sidecar.ledger import Ledger

log = logging.getLogger("sidecar.outputs")

#: How long closing a producer may take.
STOP_TIMEOUT_S = 10.0
#: Batches of outputs grow to this (aiokafka's default, 16 KiB, makes the broker handle a
#: record batch per 16 KiB); below a default broker's `message.max.bytes` (1 MiB).
MAX_BATCH_SIZE = 512 * 1024
_PRODUCER: dict[str, Any] = {
    "acks": "all",
    "enable_idempotence": True,
    "linger_ms": 0,
    "max_batch_size": MAX_BATCH_SIZE,
}
#: After a produce batch shared by several acks was refused, each ack's outputs get batches
#: of their own for this long, so the next refusal names the one ack to blame.
ISOLATE_S = 30.0
#: How long `Transactions.open` waits for a partition's producer before letting the
#: rebalance go on (the partition is taken up in the background once its producer starts).
OPEN_WAIT_S = 30.0
#: Backoff between attempts to start a partition's transactional producer.
OPEN_RETRY_S = (1.0, 30.0)


class Sink(Protocol):
    """Where outcomes go: the dispatcher, which hands them to the state machine."""

    def outputs_written(self, staged: Staged) -> None: ...
    def outputs_failed(self, staged: Staged, reason: str) -> None: ...
    def outputs_released(self, staged: Staged) -> None: ...


@dataclass(slots=True)
class OutputStats:
    """Running totals for metrics."""

    #: Output records the broker confirmed (with transactions: in committed transactions).
    produced: int = 0
    committed: int = 0
    aborted: int = 0
    fenced: int = 0
    #: Seconds spent in committed transactions, begin to commit.
    transaction_seconds: float = 0.0
    #: Wall-clock time of the last committed transaction (0: none yet).
    last_commit: float = 0.0


class _Sending:
    """An ack's outputs, or a transaction's, as produce batches: one per destination partition
    (shared by the acks, unless `isolate`), built whole and handed to aiokafka with
    `send_batch`. `send` per record costs tens of µs of Python each and leaves aiokafka's
    16 KiB batches to the broker (a record batch each to validate and append)."""

    def __init__(self, producer: AIOKafkaProducer, *, isolate: bool) -> None:
        self._producer = producer
        self._isolate = isolate
        self._routes: dict[str, tuple[list[int], list[int]]] = {}
        self._sticky: dict[str, int] = {}
        self._open: dict[tuple[object, ...], tuple[list[Staged], Any]] = {}
        #: (the acks with outputs in it, the batch, topic, partition), in the order built.
        self.batches: list[tuple[list[Staged], Any, str, int]] = []

    async def add(self, staged: Staged) -> None:
        """Appends an ack's outputs (the per-output path: kept to plain local operations)."""
        outputs = staged.outputs
        for topic in {output.topic for output in outputs} - self._routes.keys():
            everything = sorted(await self._producer.partitions_for(topic))
            cluster = self._producer.client.cluster
            self._routes[topic] = (everything, list(cluster.available_partitions_for_topic(topic)))
        # Every destination first: an ack whose outputs cannot all be routed adds none.
        partitions = [self._partition(output) for output in outputs]
        opened, isolate = self._open, self._isolate
        for output, partition in zip(outputs, partitions, strict=True):
            topic = output.topic
            where: tuple[object, ...] = (topic, partition)
            if isolate:
                where = (*where, id(staged))
            key = output.key if output.HasField("key") else None
            value = output.value if output.HasField("value") else None
            headers = (
                [(h.key, h.value if h.HasField("value") else None) for h in output.headers]
                if output.headers
                else []
            )
            entry = opened.get(where)
            if entry is None or (
                entry[1].append(timestamp=None, key=key, value=value, headers=headers) is None
            ):
                # No batch for that partition yet, or it is full. An empty batch takes any
                # record, however large (the broker judges it).
                entry = opened[where] = ([], self._producer.create_batch())
                self.batches.append((entry[0], entry[1], topic, partition))
                entry[1].append(timestamp=None, key=key, value=value, headers=headers)
            units = entry[0]
            if not units or units[-1] is not staged:
                units.append(staged)

    def _partition(self, output: pb.OutputRecord) -> int:
        """As the producer's `send` would: the one given, the key's (murmur2, as Java
        clients), or for a null key one partition per topic for the whole lot (sticky)."""
        topic = output.topic
        everything, available = self._routes[topic]
        if output.HasField("partition"):
            if output.partition not in everything:
                raise UnknownTopicOrPartitionError(f"{topic} has no partition {output.partition}")
            return output.partition
        if output.HasField("key"):
            return int(self._producer._partitioner(output.key, everything, available))
        if topic not in self._sticky:
            self._sticky[topic] = random.choice(available or everything)
        return self._sticky[topic]

    async def send(self) -> _Blame:
        """Hands the batches to the producer and waits for the broker's verdicts."""
        sent = [
            (units, await self._producer.send_batch(batch, topic, partition=partition))
            for units, batch, topic, partition in self.batches
        ]
        results = await asyncio.gather(*(future for _, future in sent), return_exceptions=True)
        blame = _Blame()
        for (units, _), result in zip(sent, results, strict=True):
            if isinstance(result, BaseException):
                if len(units) == 1:
                    blame.guilty.setdefault(units[0], result)
                else:
                    blame.shared.update(units)
        return blame


@dataclass(slots=True)
class _Blame:
    """Whose outputs the broker refused. A refused batch that several acks shared blames none
    of them (`shared`): each is delivered again, uncounted, and for `ISOLATE_S` the writer
    gives each ack's outputs batches of their own, so the next refusal names the one to blame."""

    guilty: dict[Staged, BaseException] = field(default_factory=dict)
    shared: set[Staged] = field(default_factory=set)

    def __bool__(self) -> bool:
        return bool(self.guilty or self.shared)


def _reason(exc: BaseException) -> str:
    denied = _denied(exc)
    if denied is not None:
        return f"its outputs could not be written (authorization: {denied}; {exc!r})"
    return f"its outputs could not be written ({classify(exc)}: {exc!r})"


def _denied(exc: BaseException) -> permissions.PermissionDenied | None:
    """The permission a refused output write lacks: WriteData on the topics the broker named
    (a topic it would not even describe fails earlier, as UnknownTopicOrPartition after a
    metadata timeout, or as TopicAuthorizationFailed with DescribeTopic missing as well), or
    WriteDataIdempotently for the producer itself."""
    kind = permissions.denial_class(exc)
    if kind == "ClusterAuthorizationFailedError":
        return permissions.PermissionDenied([permissions.idempotent_write()])
    if kind == "TopicAuthorizationFailedError":
        topics = permissions.denied_topics(exc)
        if topics:
            return permissions.PermissionDenied(permissions.write_topic(t) for t in topics)
    return None


def _where(staged: Staged) -> str:
    run = staged.runs[0]
    return f"{run.tp[0]}[{run.tp[1]}]@{run.offset}"


async def _close(producer: AIOKafkaProducer) -> None:
    with contextlib.suppress(Exception):
        async with asyncio.timeout(STOP_TIMEOUT_S):
            await producer.stop()


class OutputWriter:
    """Outputs without transactions: idempotent, acks=all, at least once. Acks with outputs
    are written in rounds (what arrived during one round goes in the next, in shared batches):
    aiokafka takes one batch per partition at a time, so a write per ack would queue them."""

    def __init__(self, client_kwargs: dict[str, Any], sink: Sink) -> None:
        self._client_kwargs = client_kwargs
        self._sink = sink
        self._producer: AIOKafkaProducer | None = None
        self._queue: list[Staged] = []
        self._task: asyncio.Task[None] | None = None
        self._isolate_until = 0.0
        self.stats = OutputStats()

    def submit(self, staged: Staged) -> None:
        self._queue.append(staged)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._drain())

    async def _drain(self) -> None:
        while self._queue:
            staged, self._queue = self._queue, []
            try:
                await self._write(staged)
            except asyncio.CancelledError:
                for unit in staged:
                    self._sink.outputs_released(unit)
                raise

    async def _write(self, staged: list[Staged]) -> None:
        failed: dict[Staged, BaseException] = {}
        blame = _Blame()
        try:
            producer = await self._current()
            sending = _Sending(producer, isolate=time.monotonic() < self._isolate_until)
            for unit in staged:
                try:
                    await sending.add(unit)
                except KafkaError as exc:  # no such topic or partition: adds nothing
                    failed[unit] = exc
            blame = await sending.send()
        except Exception as exc:  # the producer cannot start, or aiokafka failed the lot
            failed.update(dict.fromkeys(staged, exc))
            self._retire()
        if blame:
            # A refused batch leaves aiokafka's idempotent sequence numbers out of step with
            # the broker's (see deadletters.py): the next round gets a fresh producer.
            self._retire()
            if blame.shared:
                self._isolate_until = time.monotonic() + ISOLATE_S
        failed.update(blame.guilty)
        for unit in staged:
            if unit in failed:
                denied = _denied(failed[unit])
                log.warning(
                    f"outputs of the ack of {_where(unit)} could not be written"
                    + (f" ({denied})" if denied is not None else "")
                    + "; its records are delivered again",
                    extra={
                        "error": repr(failed[unit]),
                        "cause": classify(failed[unit]),
                        **(denied.fields() if denied is not None else {}),
                    },
                )
                self._sink.outputs_failed(unit, _reason(failed[unit]))
            elif unit in blame.shared:
                self._sink.outputs_released(unit)
            else:
                self.stats.produced += len(unit.outputs)
                self._sink.outputs_written(unit)

    def _retire(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            asyncio.get_running_loop().create_task(_close(producer))

    async def _current(self) -> AIOKafkaProducer:
        if self._producer is None:
            producer = AIOKafkaProducer(**self._client_kwargs, **_PRODUCER)
            try:
                await producer.start()
            except BaseException:
                await _close(producer)
                raise
            self._producer = producer
        return self._producer

    async def stop(self, grace_s: float = STOP_TIMEOUT_S) -> None:
        """Lets the round under way finish (its records settle), then closes the producer.
        What is cut short stays unsettled: redelivered after a restart."""
        task = self._task
        if task is not None:
            await asyncio.wait([task], timeout=grace_s)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self._retire()


class _Abort(Exception):
    """A transaction to abort; `guilty` are the acks whose outputs the broker refused."""

    def __init__(self, guilty: dict[Staged, BaseException], why: str) -> None:
        super().__init__(why)
        self.guilty = guilty


@dataclass(eq=False)
class _Partition:
    tp: tuple[str, int]
    producer: AIOKafkaProducer
    queue: list[Staged] = field(default_factory=list)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    task: asyncio.Task[None] | None = None
    fenced: bool = False
    #: Until when each ack's outputs get batches of their own (monotonic time).
    isolate_until: float = 0.0


class Transactions:
    """Per assigned partition, a transactional producer that writes staged acks' outputs
    and commits the partition's offsets in one transaction (see the module docstring)."""

    def __init__(
        self,
        config: SubscriptionConfig,
        ledger: Ledger,
        client_kwargs: dict[str, Any],
        sink: Sink,
        *,
        metadata_full: Callable[[tuple[str, int], bool], None],
        on_fenced: Callable[[tuple[str, int]], None],
        report: Callable[[str | None], Awaitable[None]],
    ) -> None:
        """`metadata_full` tells the state machine when a commit waits for its metadata to
        fit (fetching that partition pauses meanwhile); `on_fenced` hears of a partition
        whose producer was fenced; `report` of producers that cannot start (health)."""
        self.config = config
        self.group_id = config.group_id or ""
        self._ledger = ledger
        self._client_kwargs = client_kwargs
        self._sink = sink
        self._metadata_full = metadata_full
        self._on_fenced = on_fenced
        self._report = report
        self._parts: dict[tuple[str, int], _Partition] = {}
        self._opening: dict[tuple[str, int], asyncio.Task[None]] = {}
        self._failing: dict[tuple[str, int], str] = {}
        self.stats = OutputStats()

    def transactional_id(self, tp: tuple[str, int]) -> str:
        prefix = self.config.transactions.transactional_id_prefix
        return f"{prefix}.{self.group_id}.{tp[0]}.{tp[1]}"

    # -- partitions ------------------------------------------------------------------------

    async def open(
        self,
        tps: Iterable[tuple[str, int]],
        take_up: Callable[[list[tuple[str, int]]], Awaitable[None]],
    ) -> None:
        """Starts each partition's producer, which fences any previous owner's, then calls
        `take_up` (read the commit, seek, deliver) for it. Waits up to `OPEN_WAIT_S`; a
        producer that cannot start by then (broker trouble, a missing permission) keeps
        trying in the background, its partition taken up when it does."""
        tasks = []
        for tp in tps:
            if tp not in self._parts and tp not in self._opening:
                task = asyncio.create_task(self._open(tp, take_up))
                self._opening[tp] = task
                task.add_done_callback(lambda _, tp=tp: self._opening.pop(tp, None))  # type: ignore[misc]
                tasks.append(task)
        if tasks:
            await asyncio.wait(tasks, timeout=OPEN_WAIT_S)

    async def _open(
        self, tp: tuple[str, int], take_up: Callable[[list[tuple[str, int]]], Awaitable[None]]
    ) -> None:
        backoff = OPEN_RETRY_S[0]
        while True:
            producer = AIOKafkaProducer(
                **self._client_kwargs,
                transactional_id=self.transactional_id(tp),
                transaction_timeout_ms=self.config.transactions.timeout_ms,
                **_PRODUCER,
            )
            try:
                await producer.start()
                break
            except asyncio.CancelledError:  # revoked meanwhile
                await _close(producer)
                raise
            except Exception as exc:
                await _close(producer)
                txn = self.transactional_id(tp)
                problem = f"cannot start the transactional producer {txn!r} for {tp[0]}[{tp[1]}]"
                fields: dict[str, object] = {"transactional_id": txn}
                if permissions.is_denial(exc):
                    # Every partition's id shares the prefix: grant them all at once.
                    prefix = self.config.transactions.transactional_id_prefix
                    denied = permissions.PermissionDenied(
                        [permissions.transactional_ids(f"{prefix}.{self.group_id}.*")]
                    )
                    problem += (
                        f": {denied} (transactions.transactional_id_prefix {prefix!r}; {exc!r})"
                    )
                    fields.update(denied.fields())
                else:
                    problem += f": {exc!r}"
                await self._fail(tp, problem, retry_in=backoff, fields=fields)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, OPEN_RETRY_S[1])
        self._parts[tp] = _Partition(tp, producer)
        await self._fail(tp, None)
        try:
            await take_up([tp])
        except Exception:
            # Without a commit to start from, the partition must not deliver: give it up
            # and let the group hand it out again.
            log.exception("cannot take up a partition", extra={"partition": tp})
            self._fence(self._parts[tp], None)

    async def _fail(
        self,
        tp: tuple[str, int],
        problem: str | None,
        retry_in: float = 0,
        fields: dict[str, object] | None = None,
    ) -> None:
        if problem is None:
            if self._failing.pop(tp, None) is None:
                return
        else:
            log.error(
                problem,
                extra={
                    "subscription": self.config.name,
                    "topic": tp[0],
                    "partition": tp[1],
                    "retry_in_s": retry_in,
                    **(fields or {}),
                },
            )
            self._failing[tp] = problem
        await self._report("; ".join(self._failing.values()) or None)

    async def close(self, tps: Iterable[tuple[str, int]]) -> None:
        """The partitions go (revoked, or the member leaves): after `commit`."""
        closing = []
        for tp in tps:
            if (task := self._opening.pop(tp, None)) is not None:
                task.cancel()
            await self._fail(tp, None)
            part = self._parts.pop(tp, None)
            if part is not None:
                if part.task is not None:
                    part.task.cancel()
                closing.append(_close(part.producer))
        await asyncio.gather(*closing)

    # -- staged acks -----------------------------------------------------------------------

    def submit(self, staged: Staged) -> None:
        part = self._parts.get(staged.tp)
        if part is None or part.fenced:
            self._sink.outputs_released(staged)  # a no-op unless it is still held
            return
        part.queue.append(staged)
        if part.task is None or part.task.done():
            part.task = asyncio.create_task(self._drain(part))

    async def _drain(self, part: _Partition) -> None:
        while part.queue and not part.fenced:
            if not await self._commit(part):
                return  # waits for the metadata to fit: the commit loop tries again

    async def commit(self, tps: Iterable[tuple[str, int]] | None = None) -> None:
        """Commits (partitions `tps`, or all) whose offsets moved or that have staged acks."""
        pending = self._ledger.pending_commits()
        parts = [
            part
            for tp, part in self._parts.items()
            if (tps is None or tp in tps) and (tp in pending or part.queue)
        ]
        await asyncio.gather(*(self._commit(part) for part in parts))

    async def _commit(self, part: _Partition) -> bool:
        """One transaction: the staged acks' outputs and the partition's commit. False
        when it had to wait because the commit's metadata could not name every settled
        record above the commit point (the staged acks stay queued)."""
        async with part.lock:
            if part.fenced or self._parts.get(part.tp) is not part:
                return True
            ledger = self._ledger.partition(part.tp)
            staged, part.queue = part.queue, []
            if ledger is None:  # nothing fetched in this assignment: nothing to commit
                for unit in staged:
                    self._sink.outputs_released(unit)
                return True
            also = {offset for unit in staged for offset in unit.offsets()}
            if not ledger.commit_point(also).complete:
                self._metadata_full(part.tp, True)
                part.queue[:0] = staged
                return False
            producer = part.producer
            started = time.perf_counter()
            try:
                await producer.begin_transaction()
                await self._write(part, staged)
                if self._ledger.partition(part.tp) is not ledger:
                    raise _Abort({}, "the partition was revoked or reset meanwhile")
                # Acks that came meanwhile are settled: the commit steps over them too.
                point = ledger.commit_point(also)
                if not point.complete:
                    raise _Abort({}, "the commit metadata cannot hold every settled range")
                await producer.send_offsets_to_transaction(
                    {TopicPartition(*part.tp): OffsetAndMetadata(point.offset, point.metadata)},
                    self.group_id,
                )
                await producer.commit_transaction()
            except asyncio.CancelledError:
                for unit in staged:
                    self._sink.outputs_released(unit)
                raise
            except Exception as exc:
                await self._aborted(part, staged, exc)
                return True
            self.stats.committed += 1
            self.stats.transaction_seconds += time.perf_counter() - started
            self.stats.last_commit = time.time()
            self.stats.produced += sum(len(unit.outputs) for unit in staged)
            for unit in staged:
                self._sink.outputs_written(unit)
            self._ledger.mark_committed({part.tp: point.offset}, {part.tp: point.settled_above})
            self._metadata_full(part.tp, False)
            return True

    @staticmethod
    async def _write(part: _Partition, staged: list[Staged]) -> None:
        """Sends every output and waits for the broker; raises `_Abort` naming the acks whose
        outputs it refused (see `_Blame`)."""
        sending = _Sending(part.producer, isolate=time.monotonic() < part.isolate_until)
        for unit in staged:
            try:
                await sending.add(unit)
            except KafkaError as exc:  # no such topic or partition
                raise _Abort({unit: exc}, "outputs refused") from exc
        blame = await sending.send()
        if blame.shared:
            part.isolate_until = time.monotonic() + ISOLATE_S
        if blame:
            raise _Abort(blame.guilty, "outputs refused")

    async def _aborted(self, part: _Partition, staged: list[Staged], exc: BaseException) -> None:
        producer = part.producer
        guilty = exc.guilty if isinstance(exc, _Abort) else {}
        txn = producer._txn_manager
        fatal = txn is None or txn.is_fatal_error()
        if not fatal:
            try:
                await producer.abort_transaction()
            except Exception:
                fatal = True
        if fatal:
            for unit in staged:
                self._sink.outputs_released(unit)
            self._fence(part, exc)
            return
        self.stats.aborted += 1
        log.warning(
            f"transaction for {part.tp[0]}[{part.tp[1]}] aborted; its acks' records are "
            "delivered again",
            extra={
                "subscription": self.config.name,
                "error": repr(exc),
                "refused": {_where(unit): _reason(error) for unit, error in guilty.items()},
            },
        )
        for unit in staged:
            if unit in guilty:
                self._sink.outputs_failed(unit, _reason(guilty[unit]))
            else:
                self._sink.outputs_released(unit)

    def _fence(self, part: _Partition, exc: BaseException | None) -> None:
        """The producer is done for (fenced by a new owner, or its transaction timed out):
        the partition delivers nothing more here until the group hands it out again."""
        if part.fenced:
            return
        part.fenced = True
        self.stats.fenced += 1
        for unit in part.queue:
            self._sink.outputs_released(unit)
        part.queue.clear()
        log.warning(
            f"transactional producer for {part.tp[0]}[{part.tp[1]}] fenced or failed: "
            "another member owns the partition now, or its transaction outlived "
            "transactions.timeout_ms; nothing it wrote since its last commit becomes visible. "
            "Rejoining the group",
            extra={"subscription": self.config.name, "error": repr(exc)},
        )
        self._on_fenced(part.tp)

    async def stop(self) -> None:
        await self.close(list(self._parts) + list(self._opening))
