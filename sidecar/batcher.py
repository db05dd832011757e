"""Batching policy: which fetched records go into the next batch, and when.

Pure (no I/O, no clock of its own): the dispatcher passes `now` in. Records wait here between
the fetch and their delivery, and again between a nack and their redelivery, so this is also
where ordering is enforced: under `ordering: partition` a partition contributes only when none
of its records are out with the app, and always from its lowest offset, so a retried record
goes out again before anything after it. Under `ordering: key` (one record per run) a record
goes out only when no record of its key and partition is out, on its way to the DLQ or
waiting out a retry backoff, and never before an earlier one of its key.

What waits here are runs: records of one partition fetched together and handed out together
(one object per run, not per record, keeps the cost per record down). A run is split only
where a batch's limits cut it.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Generic, Protocol, Self, TypeVar

TopicPartition = tuple[str, int]


class Queued(Protocol):
    """What the batching policy needs to know of a run of records waiting for delivery."""

    tp: TopicPartition
    #: Offset of its first record.
    offset: int
    #: Flow-control bytes of all its records.
    size: int
    #: Monotonic time it became deliverable (fetch time, or end of its retry backoff):
    #: linger counts from here.
    since: float

    @property
    def key(self) -> bytes | None:
        """Its record's key, under `ordering: key` (runs are single records there)."""
        ...

    def __len__(self) -> int:
        """Records in the run (at least one)."""
        ...

    @property
    def last(self) -> int:
        """Offset of its last record."""
        ...

    def fit(self, max_records: int, max_bytes: int) -> int:
        """How many of its first records fit in `max_records` and `max_bytes`."""
        ...

    def split(self, count: int) -> Self:
        """Keeps its first `count` records (0 < count < len) and returns the rest."""
        ...


R = TypeVar("R", bound=Queued)


@dataclass(frozen=True, slots=True)
class BatchLimits:
    max_records: int
    max_bytes: int
    max_wait_s: float


@dataclass(slots=True)
class _Queue(Generic[R]):
    tp: TopicPartition
    records: deque[R] = field(default_factory=deque)
    #: Records (not runs) and bytes in `records`.
    count: int = 0
    bytes: int = 0


class Backlog(Generic[R]):
    """Records fetched but not out with the app, per partition, plus retries waiting out
    their backoff."""

    __slots__ = (
        "_delayed",
        "_keyed",
        "_limits",
        "_one_partition",
        "_ordered",
        "_queues",
        "_rotation",
        "_seq",
    )

    def __init__(
        self,
        limits: BatchLimits,
        *,
        ordered: bool,
        keyed: bool = False,
        one_partition: bool = False,
    ) -> None:
        """`one_partition`: every batch holds records of one partition (transactions: an
        ack of a batch commits with that partition's offsets)."""
        self._limits = limits
        self._ordered = ordered
        self._keyed = keyed
        self._one_partition = one_partition
        self._queues: dict[TopicPartition, _Queue[R]] = {}
        self._delayed: list[tuple[float, int, R]] = []
        self._seq = itertools.count()
        self._rotation = 0

    # -- filling ---------------------------------------------------------------------------

    def add(self, pending: R) -> None:
        """A freshly fetched record; offsets arrive in order per partition."""
        queue = self._queues.get(pending.tp)
        if queue is None:
            queue = self._queues[pending.tp] = _Queue[R](pending.tp)
        queue.records.append(pending)
        queue.count += len(pending)
        queue.bytes += pending.size

    def retry(self, pending: R, not_before: float) -> None:
        """A record to deliver again once `not_before` has passed."""
        heapq.heappush(self._delayed, (not_before, next(self._seq), pending))

    def release_due(self, now: float) -> None:
        """Moves retries whose backoff is over back into their partition, in offset order."""
        while self._delayed and self._delayed[0][0] <= now:
            _, _, pending = heapq.heappop(self._delayed)
            pending.since = now
            queue = self._queues.get(pending.tp)
            if queue is None:
                queue = self._queues[pending.tp] = _Queue[R](pending.tp)
            records = queue.records
            # Usually it belongs at the front; scan from there for the rare multi-retry case.
            index = 0
            while index < len(records) and records[index].offset < pending.offset:
                index += 1
            records.insert(index, pending)
            queue.count += len(pending)
            queue.bytes += pending.size

    def next_due(self) -> float | None:
        """When the earliest waiting retry becomes deliverable."""
        return self._delayed[0][0] if self._delayed else None

    # -- draining --------------------------------------------------------------------------

    def drop(self, tps: set[TopicPartition]) -> list[R]:
        """Forgets revoked partitions (their records go to the partitions' next owner)."""
        dropped: list[R] = []
        for tp in tps:
            queue = self._queues.pop(tp, None)
            if queue is not None:
                dropped.extend(queue.records)
        if any(p.tp in tps for _, _, p in self._delayed):
            dropped.extend(p for _, _, p in self._delayed if p.tp in tps)
            self._delayed = [item for item in self._delayed if item[2].tp not in tps]
            heapq.heapify(self._delayed)
        return dropped

    def buffered(self, tp: TopicPartition) -> tuple[int, int]:
        """(records, bytes) waiting for delivery in one partition, retries included."""
        queue = self._queues.get(tp)
        records, size = (queue.count, queue.bytes) if queue else (0, 0)
        for _, _, pending in self._delayed:
            if pending.tp == tp:
                records += len(pending)
                size += pending.size
        return records, size

    def lowest_offset(self, tp: TopicPartition) -> int | None:
        """The lowest offset of this partition not yet handed out, retries included."""
        queue = self._queues.get(tp)
        lowest = queue.records[0].offset if queue and queue.records else None
        for _, _, pending in self._delayed:
            if pending.tp == tp and (lowest is None or pending.offset < lowest):
                lowest = pending.offset
        return lowest

    def find(self, tp: TopicPartition, offset: int) -> tuple[R, bool] | None:
        """The run holding `offset` of `tp` here, and whether it waits out a retry backoff."""
        queue = self._queues.get(tp)
        for pending in queue.records if queue else ():
            if pending.offset <= offset <= pending.last:
                return pending, False
        for _, _, pending in self._delayed:
            if pending.tp == tp and pending.offset <= offset <= pending.last:
                return pending, True
        return None

    def waiting_keys(self) -> dict[TopicPartition, set[bytes | None]]:
        """Per partition, the keys of records waiting out a retry backoff (`ordering: key`:
        their later records wait for them)."""
        waiting: dict[TopicPartition, set[bytes | None]] = {}
        for _, _, pending in self._delayed:
            waiting.setdefault(pending.tp, set()).add(pending.key)
        return waiting

    def __len__(self) -> int:
        """Records waiting, retries included."""
        return sum(q.count for q in self._queues.values()) + sum(
            len(pending) for _, _, pending in self._delayed
        )

    def _eligible(self, blocked: set[TopicPartition]) -> list[_Queue[R]]:
        """Queues that may contribute now: not blocked by the caller (revoking, or busy
        under partition ordering) and, under partition ordering, with no record of theirs
        waiting out a retry backoff (it must go out again before anything after it)."""
        delayed = {p.tp for _, _, p in self._delayed} if self._ordered else ()
        return [
            q
            for tp, q in self._queues.items()
            if q.records and tp not in blocked and tp not in delayed
        ]

    def ready_at(
        self, blocked: set[TopicPartition], max_records: int, max_bytes: int, now: float
    ) -> float | None:
        """When a batch should go out: `now` (or earlier) if a full batch is waiting, else
        when the oldest eligible record's linger ends; None if nothing is eligible.

        `blocked` are partitions that get nothing now (see `_eligible`);
        `max_records`/`max_bytes` are the batch limits already cut
        down to the receiving stream's free window, so a small window sends at once rather
        than lingering for a batch it could never take.
        """
        queues = self._eligible(blocked)
        if not queues:
            return None
        records = 0
        size = 0
        oldest = now
        for queue in queues:
            records += queue.count
            size += queue.bytes
            oldest = min(oldest, queue.records[0].since)
        if records >= max_records or size >= max_bytes:
            return now
        return oldest + self._limits.max_wait_s

    def take(
        self,
        blocked: set[TopicPartition],
        max_records: int,
        max_bytes: int,
        *,
        oversize: bool = True,
        held: dict[TopicPartition, set[bytes | None]] | None = None,
    ) -> list[R]:
        """The next batch: at most `max_records` and `max_bytes`, lowest offsets first within
        each partition, partitions in rotation so none starves. With `oversize` (the
        receiving stream holds nothing) one record larger than `max_bytes` may go alone;
        without it a stream's bytes window is never exceeded, and the batch may be empty."""
        queues = self._eligible(blocked)
        if not queues:
            return []
        self._rotation = (self._rotation + 1) % len(queues)
        queues = queues[self._rotation :] + queues[: self._rotation]
        if self._keyed:
            return self._take_keyed(queues, max_records, max_bytes, oversize, held or {})
        batch: list[R] = []
        count = size = 0
        for queue in queues:
            records = queue.records
            while records and count < max_records:
                head = records[0]
                taken = len(head)
                if count + taken > max_records or size + head.size > max_bytes:
                    taken = head.fit(max_records - count, max_bytes - size)
                    if not taken:
                        if batch or not oversize:
                            return batch
                        taken = 1  # one record larger than the batch goes alone
                    if taken < len(head):
                        records[0] = head.split(taken)
                    else:
                        records.popleft()
                else:
                    records.popleft()
                queue.count -= taken
                queue.bytes -= head.size
                count += taken
                size += head.size
                batch.append(head)
            if count >= max_records or (batch and self._one_partition):
                break
        return batch

    def _take_keyed(
        self,
        queues: list[_Queue[R]],
        max_records: int,
        max_bytes: int,
        oversize: bool,
        held: dict[TopicPartition, set[bytes | None]],
    ) -> list[R]:
        """`take` under `ordering: key`: the lowest waiting record of each key whose key is not
        `held` (out with the app or on its way to the DLQ, per partition: updated here with
        the keys taken) nor waiting out a retry backoff. A record passed over holds back the
        later ones of its key."""
        waiting = self.waiting_keys()
        batch: list[R] = []
        size = 0
        for queue in queues:
            if len(batch) >= max_records or (batch and self._one_partition):
                break
            blocked = held.setdefault(queue.tp, set())
            passed = set(waiting.get(queue.tp, ()))
            kept: deque[R] = deque()
            records = queue.records
            while records:
                pending = records.popleft()
                key = pending.key
                if len(batch) >= max_records or key in blocked or key in passed:
                    kept.append(pending)
                    passed.add(key)
                    continue
                if size + pending.size > max_bytes and (batch or not oversize):
                    # Full: the rest waits, in order.
                    kept.append(pending)
                    kept.extend(records)
                    records.clear()
                    break
                batch.append(pending)
                blocked.add(key)
                size += pending.size
                queue.count -= 1
                queue.bytes -= pending.size
            queue.records = kept
        return batch
