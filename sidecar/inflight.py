"""Where every fetched, unsettled record is: the settlement state machine of one subscription.

A record fetched for an assigned partition is, until it is settled, in exactly one place:

- waiting for a stream in the backlog (fresh, handed back, or in retry backoff),
- out with one stream, in one of that stream's batches,
- on its way to the dead-letter topic,
- acked with outputs (an ack's records to produce), settled once those are written
  (`Staged`: with transactions, once the transaction holding them and the commit commits).

Every transition between those places happens here, in plain synchronous methods that
return domain outcomes (refused refs, batches to send, dead letters to write); the
dispatcher is the asyncio shell that feeds this and turns outcomes into protobuf. The
per-partition facts are kept once: a partition's `out` map holds exactly the records out
with a stream or on their way to the dead-letter topic (so "busy" under partition ordering
and the revoke grace's "still unsettled" are `len(out)`), the backlog holds the waiting ones,
and the ledger says what is settled and where the commit stands.

Each assignment of a partition has an epoch, and every record carries the epoch it was
fetched in: a confirmation or an ack from an older assignment (a dead letter confirmed after
a rebalance, an ack after a live offset reset) never touches the new one.

Liveness is part of correctness here: whatever the app sends, once a well-behaved stream
acks everything it gets (and the dead-letter topic accepts writes), every record is settled
and every partition's commit reaches its end (tests/test_inflight.py proves it with a
hypothesis state machine). That is why retry backoffs are capped by the policy whatever an
app asks for, and why a record never leaves this machine except by being settled or by its
partition being revoked or reset.

Records travel in runs (`Pending`): the consecutive records of one partition that one fetch
brought, handed out, acked and retried together, so the cost per record is a few list and
dict operations in C, not Python objects of our own. A run is split only where the app or
the policy treats its records apart: a batch limit cutting it, an ack or nack naming a single
record, dead-lettering (one letter per record), and tracing (a span per record).

Pure: no I/O, no asyncio, no clock (callers pass `now`), no protobuf (records arrive as the
transcoder's `Record` bytes and leave the same way).
"""

from __future__ import annotations

import enum
import itertools
import random
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from sidecar.batcher import Backlog, BatchLimits, TopicPartition
from sidecar.config import SubscriptionConfig
from sidecar.ledger import Ledger

#: (topic, partition, offset): a record named in an ack or a nack.
RecordRef = tuple[str, int, int]

#: How many ended batch ids a stream remembers, to say why a late ack is refused.
_CLOSED_BATCH_MEMORY = 10_000
#: Most characters of a nack's reason kept (it becomes the dead letter's x-dlq-reason
#: header): an app's megabyte of reason must not make the dead letter unwritable.
MAX_REASON = 4096


class Refusal(enum.Enum):
    """Why part of an ack or nack was not applied (the stream stays open)."""

    UNKNOWN = "no such batch or record is held by this stream"
    ALREADY_SETTLED = "already settled"
    REVOKED = "partition revoked: the record goes to its next owner"
    INVALID = "invalid request"
    EXPIRED = "its ack deadline passed; it was redelivered"


@dataclass(frozen=True, slots=True)
class Policy:
    """What the subscription's config says about delivery, in the units used here."""

    batch: BatchLimits
    #: `ordering: partition`: one batch of a partition out at a time.
    ordered: bool
    ack_deadline_s: float
    max_attempts: int
    initial_backoff_s: float
    multiplier: float
    max_backoff_s: float
    dead_letters: bool
    #: Most records a partition may have tracked above its commit point before fetching it
    #: pauses (the settled ones there are what the commit metadata describes).
    max_unsettled_span: int
    #: Most bytes one fetch brings for a partition (the consumer's
    #: max_partition_fetch_bytes): the backlog's pause threshold leaves room for one.
    fetch_bytes: int = 1_048_576
    #: `ordering: key`: one record of a key (per partition) out at a time, lowest first.
    keyed: bool = False
    #: Ack outputs go into per-partition transactions: a batch holds one partition, and
    #: so must an ack with outputs.
    transactional: bool = False

    @classmethod
    def of(cls, config: SubscriptionConfig) -> Policy:
        retry = config.retry
        return cls(
            batch=BatchLimits(
                config.batch.max_records, config.batch.max_bytes, config.batch.max_wait_ms / 1000
            ),
            ordered=config.ordering == "partition",
            ack_deadline_s=config.ack_deadline_ms / 1000,
            max_attempts=retry.max_attempts,
            initial_backoff_s=retry.initial_backoff_ms / 1000,
            multiplier=retry.multiplier,
            max_backoff_s=retry.max_backoff_ms / 1000,
            dead_letters=config.dead_letter is not None,
            max_unsettled_span=config.max_unsettled_span,
            fetch_bytes=config.consumer.max_partition_fetch_bytes,
            keyed=config.ordering == "key",
            transactional=config.transactions.enabled,
        )


@dataclass(slots=True)
class Stats:
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
    #: Dead-letter confirmations that arrived for an older assignment, and were ignored.
    stale_confirmations: int = 0
    #: Acks that came with outputs, and of their records those whose outputs failed (sent
    #: back for redelivery).
    acks_with_outputs: int = 0
    outputs_failed: int = 0


class Fetched(Protocol):
    """What a fetch of one partition brings (the transcoder's `Transcoded`): records i is
    `wire[ends[i - 1]:ends[i]]` (from 0 for the first), at `offsets[i]`, of flow-control
    size `sizes[i]`; offsets ascending."""

    @property
    def wire(self) -> bytes: ...
    @property
    def ends(self) -> list[int]: ...
    @property
    def offsets(self) -> list[int]: ...
    @property
    def sizes(self) -> list[int]: ...
    @property
    def keys(self) -> list[bytes | None] | None:
        """Each record's key, when the fetch was made with them (`ordering: key`)."""
        ...


@dataclass(slots=True, eq=False)
class Pending:
    """A run of records owed to the app: `fetch`'s records `lo` to `hi` (exclusive), all of
    one partition, next to each other in what was fetched, delivered together."""

    tp: TopicPartition
    fetch: Fetched
    lo: int
    hi: int
    #: Offset of its first record.
    offset: int
    #: Flow-control bytes of its records.
    size: int
    #: Deliveries so far; the next one is `attempts + 1` (its records' `delivery_attempt`).
    attempts: int = 0
    #: Monotonic time it became deliverable (fetch time, or end of its retry backoff):
    #: linger counts from here.
    since: float = 0.0
    #: The OpenTelemetry span of its current delivery, when tracing is on.
    span: Any = None
    #: The assignment of its partition it was fetched in (results of older ones are void).
    epoch: int = 0
    #: The batch holding it while it is out with a stream.
    batch: Batch | None = None
    #: The ack holding it while that ack's outputs are written.
    staged: Staged | None = None

    @classmethod
    def of(
        cls, tp: TopicPartition, fetch: Fetched, lo: int, hi: int, now: float, epoch: int
    ) -> Pending:
        return cls(
            tp, fetch, lo, hi, fetch.offsets[lo], sum(fetch.sizes[lo:hi]), since=now, epoch=epoch
        )

    def __len__(self) -> int:
        return self.hi - self.lo

    @property
    def offsets(self) -> list[int]:
        return self.fetch.offsets[self.lo : self.hi]

    @property
    def last(self) -> int:
        return self.fetch.offsets[self.hi - 1]

    @property
    def key(self) -> bytes | None:
        """The key of its first record (under `ordering: key`, of its only one)."""
        keys = self.fetch.keys
        return None if keys is None else keys[self.lo]

    def record(self) -> bytes:
        """The `Record` bytes of its first record (of its only one, where that matters)."""
        ends = self.fetch.ends
        return self.fetch.wire[ends[self.lo - 1] if self.lo else 0 : ends[self.lo]]

    def fit(self, max_records: int, max_bytes: int) -> int:
        """How many of its first records fit in `max_records` and `max_bytes`."""
        count = min(self.hi - self.lo, max_records)
        if count <= 0:
            return 0
        sizes = self.fetch.sizes[self.lo : self.lo + count]
        return bisect_right(list(itertools.accumulate(sizes)), max_bytes)

    def split(self, count: int) -> Pending:
        """Keeps its first `count` records (0 < count < len) and returns the rest, which
        shares everything else (batch, attempts, epoch) until it goes its own way."""
        at = self.lo + count
        fetch = self.fetch
        tail = Pending(
            self.tp,
            fetch,
            at,
            self.hi,
            fetch.offsets[at],
            sum(fetch.sizes[at : self.hi]),
            self.attempts,
            self.since,
            None,
            self.epoch,
            self.batch,
            self.staged,
        )
        self.hi = at
        self.size -= tail.size
        return tail


@dataclass(slots=True, eq=False)
class Batch:
    id: int
    window: Window
    deadline: float
    #: Records of this batch not yet settled nor taken back, in delivery order.
    records: dict[Pending, None]


@dataclass(eq=False)
class Window:
    """One app stream's flow-control window and the batches it holds."""

    id: str
    max_batches: int
    max_records: int
    max_bytes: int
    batches: dict[int, Batch] = field(default_factory=dict)
    out_records: int = 0
    out_bytes: int = 0
    next_batch_id: int = 1
    draining: bool = False
    #: Batch ids that ended before being settled, and why: a late ack is told the reason.
    closed: dict[int, Refusal] = field(default_factory=dict)

    def room(self) -> tuple[int, int] | None:
        """(records, bytes) it can still take in one batch, or None when its window is full.

        A record larger than the whole window still goes out, alone, to an idle stream (the
        bytes room of an idle stream is its whole window; `take` lets one record exceed it
        only then)."""
        if self.draining or len(self.batches) >= self.max_batches:
            return None
        records = self.max_records - self.out_records
        size = self.max_bytes - self.out_bytes
        if records <= 0 or size <= 0:
            return None
        return records, size

    def _close(self, batch: Batch, why: Refusal) -> None:
        del self.batches[batch.id]
        self.closed[batch.id] = why
        if len(self.closed) > _CLOSED_BATCH_MEMORY:
            del self.closed[next(iter(self.closed))]


@dataclass(slots=True, eq=False)
class _Partition:
    epoch: int
    #: Records out with a stream (pending.batch set) or on their way to the dead-letter
    #: topic (pending.batch None), by offset.
    out: dict[int, Pending] = field(default_factory=dict)
    revoking: bool = False
    #: [start, end) offset ranges settled by a previous owner (from the commit metadata):
    #: fetched again, they are settled at once instead of delivered.
    skip: list[tuple[int, int]] = field(default_factory=list)
    #: Set when the last commit's metadata could not describe every settled range: fetching
    #: pauses until it can again.
    metadata_full: bool = False


@dataclass(slots=True)
class Refused:
    """The refused parts of one ack or nack, grouped by reason."""

    batches: dict[Refusal, list[int]] = field(default_factory=dict)
    records: dict[Refusal, list[RecordRef]] = field(default_factory=dict)
    #: Says more than the reasons' own words, when there is more to say.
    message: str | None = None

    def batch(self, batch_id: int, why: Refusal) -> None:
        self.batches.setdefault(why, []).append(batch_id)

    def record(self, ref: RecordRef, why: Refusal) -> None:
        self.records.setdefault(why, []).append(ref)

    def __len__(self) -> int:
        return sum(map(len, self.batches.values())) + sum(map(len, self.records.values()))


@dataclass(slots=True)
class Expired:
    window: Window
    batch_id: int
    records: int


@dataclass(slots=True)
class Dispatch:
    """What one look at the backlog decided."""

    #: New batches, each with the window that gets it, records in delivery order.
    batches: list[Batch] = field(default_factory=list)
    #: Batches whose ack deadline passed (their records were taken back).
    expired: list[Expired] = field(default_factory=list)
    #: When to look again (linger, backoff or deadline), or None: only input can help.
    wake_at: float | None = None


#: A record (a run of one) given up on, and why: written to the dead-letter topic by the
#: shell, which reports back with `dead_lettered`.
Letter = tuple[Pending, str]


@dataclass(slots=True, eq=False)
class Staged:
    """An ack that came with outputs: its records are settled only once the shell has
    written `outputs` (opaque here) and reports back with `InFlight.written`, or sends them
    back with `failed` or `released`."""

    runs: list[Pending]
    outputs: Any

    @property
    def tp(self) -> TopicPartition:
        """Its partition (under transactions, its only one)."""
        return self.runs[0].tp

    def offsets(self) -> list[int]:
        return [offset for run in self.runs for offset in run.offsets]


class InFlight:
    """The settlement state machine of one subscription (see the module docstring)."""

    def __init__(
        self,
        policy: Policy,
        ledger: Ledger | None = None,
        *,
        stats: Stats | None = None,
        rng: random.Random | None = None,
        on_end: Callable[[Pending, str], None] | None = None,
    ) -> None:
        """`on_end` is told when each delivery ends (tracing spans): runs are then single
        records, since each record's span ends on its own; so they are under `ordering: key`,
        where each record waits for its own key."""
        self.policy = policy
        self.ledger = ledger or Ledger()
        self.backlog: Backlog[Pending] = Backlog(
            policy.batch,
            ordered=policy.ordered,
            keyed=policy.keyed,
            one_partition=policy.transactional,
        )
        self.stats = stats or Stats()
        self.windows: dict[str, Window] = {}
        self._parts: dict[TopicPartition, _Partition] = {}
        #: Partitions revoked since they were last assigned: acks for them say REVOKED.
        self._revoked: set[TopicPartition] = set()
        self._epochs = itertools.count(1)
        self._rng = rng or random.Random()
        #: Called when a record's delivery ends (tracing spans), with the outcome.
        self._on_end = on_end
        self._per_record = on_end is not None or policy.keyed
        #: Dead letters decided since the shell last took them.
        self._letters: list[Letter] = []
        #: Acks with outputs since the shell last took them.
        self._staged: list[Staged] = []

    # -- partitions --------------------------------------------------------------------------

    @property
    def assigned(self) -> set[TopicPartition]:
        return set(self._parts)

    def assign(self, tps: Iterable[TopicPartition]) -> set[TopicPartition]:
        """New assignments (a fresh epoch each); returns the ones that were not held yet."""
        new = set()
        for tp in tps:
            if tp not in self._parts:
                self._parts[tp] = _Partition(next(self._epochs))
                new.add(tp)
            self._revoked.discard(tp)
        return new

    def begin_revoke(self, tps: Iterable[TopicPartition]) -> None:
        """No new deliveries from these partitions; what the app holds may still be settled."""
        for tp in tps:
            part = self._parts.get(tp)
            if part is not None:
                part.revoking = True

    def unsettled_in(self, tps: Iterable[TopicPartition]) -> int:
        """Records of these partitions out with the app or on their way to the DLQ."""
        return sum(
            _records(part.out.values()) for tp in tps if (part := self._parts.get(tp)) is not None
        )

    def revoke(self, tps: Iterable[TopicPartition]) -> set[TopicPartition]:
        """Forgets the partitions: the next owner gets what was not settled. Returns the
        partitions that were held."""
        gone = {tp for tp in tps if tp in self._parts}
        for tp in gone:
            self._forget(tp, self._parts.pop(tp), "revoked")
            self._revoked.add(tp)
        return gone

    def reset(self, tps: Iterable[TopicPartition]) -> None:
        """The partitions were repositioned (a live offset reset): what was fetched or in
        flight is void, late acks for it are refused, and the ledger starts again at the
        next record fetched."""
        for tp in tps:
            part = self._parts.get(tp)
            if part is not None:
                self._forget(tp, part, "reset")
                self._parts[tp] = _Partition(next(self._epochs))

    def _forget(self, tp: TopicPartition, part: _Partition, outcome: str) -> None:
        self.backlog.drop({tp})
        touched: dict[Batch, None] = {}
        for pending in part.out.values():
            batch = pending.batch
            if batch is not None:
                self._take_back(pending, batch, outcome)
                touched[batch] = None
        for batch in touched:
            if not batch.records and batch.id in batch.window.batches:
                batch.window._close(batch, Refusal.REVOKED)
        part.out.clear()
        self.ledger.revoke(tp)

    def skip(self, tp: TopicPartition, ranges: list[tuple[int, int]]) -> None:
        """Offsets of `tp` settled by an earlier owner: settled when fetched, not delivered."""
        part = self._parts.get(tp)
        if part is not None:
            part.skip = sorted(ranges)

    # -- from the consumer -------------------------------------------------------------------

    def add(self, tp: TopicPartition, fetch: Fetched, now: float) -> bool:
        """The records one fetch brought for one partition, in offset order. Returns True
        when they start below what was already fetched: the consumer was repositioned (e.g.
        by `auto_offset_reset` after the log was truncated), so the partition starts over from
        them, as after a reset."""
        part = self._parts.get(tp)
        offsets = fetch.offsets
        if not offsets or part is None or part.revoking:
            # A revoking (or no longer owned) partition's records belong to its next owner;
            # not tracking them keeps the commit from passing them.
            return False
        ledger = self.ledger.partition(tp)
        repositioned = ledger is not None and offsets[0] < ledger.next_offset
        if repositioned:
            self.reset([tp])
            part = self._parts[tp]
            ledger = None
        if ledger is None:
            # The first record fetched in an assignment is where its ledger starts.
            self.ledger.assign(tp, offsets[0])
            ledger = self.ledger.partition(tp)
            assert ledger is not None
        ledger.track_run(offsets)
        runs = [(0, len(offsets))]
        if part.skip:
            runs = self._skip(part.skip, offsets, ledger.settle)
        if self._per_record:
            runs = [(i, i + 1) for lo, hi in runs for i in range(lo, hi)]
        add, epoch = self.backlog.add, part.epoch
        for lo, hi in runs:
            add(Pending.of(tp, fetch, lo, hi, now, epoch))
        return repositioned

    def _skip(
        self, skip: list[tuple[int, int]], offsets: list[int], settle: Callable[[int], Any]
    ) -> list[tuple[int, int]]:
        """Settles the fetched records an earlier owner settled (`skip`, consumed as offsets
        go by); returns the runs of the others, as index ranges."""
        runs: list[tuple[int, int]] = []
        lo = 0
        for index, offset in enumerate(offsets):
            if _in_ranges(skip, offset):
                settle(offset)
                self.stats.skipped += 1
                if lo < index:
                    runs.append((lo, index))
                lo = index + 1
            elif not skip:
                break
        if lo < len(offsets):
            runs.append((lo, len(offsets)))
        return runs

    def backpressure(self, tp: TopicPartition, paused: bool) -> bool:
        """Whether fetching `tp` should be paused (given whether it is now).

        Paused at two fetches' (or batches', when those are larger) worth of bytes waiting
        and resumed below one. A fetch arrives whole, and aiokafka asks for the next one as
        soon as it is handed over; pausing throws that one away, so the threshold leaves room
        for it, and the gap keeps it from flapping. Also paused while the partition's span of
        tracked records above its commit point is at the cap (which bounds records, whatever
        their size) or its commit metadata is full: one stuck record must not let memory grow
        without bound."""
        part = self._parts.get(tp)
        if part is None:
            return False
        ledger = self.ledger.partition(tp)
        if part.metadata_full or (
            ledger is not None and ledger.span >= self.policy.max_unsettled_span
        ):
            return True
        low = max(self.policy.batch.max_bytes, self.policy.fetch_bytes)
        _, size = self.backlog.buffered(tp)
        return size >= (low if paused else 2 * low)

    def metadata_full(self, tp: TopicPartition, full: bool) -> None:
        """Whether the last commit's metadata left settled ranges out (see `backpressure`)."""
        part = self._parts.get(tp)
        if part is not None:
            part.metadata_full = full

    # -- streams -----------------------------------------------------------------------------

    def attach(self, window: Window) -> None:
        self.windows[window.id] = window

    def detach(self, window: Window, now: float) -> int:
        """The stream ended: what it held goes back to the backlog for another stream.
        Returns how many records that was."""
        if self.windows.pop(window.id, None) is None:
            return 0
        returned = 0
        for batch in list(window.batches.values()):
            for pending in list(batch.records):
                self._take_back(pending, batch, "stream_lost")
                self._requeue(pending, now)
                returned += len(pending)
        window.batches.clear()
        self.stats.stream_lost += returned
        return returned

    # -- from the app ------------------------------------------------------------------------

    def ack(
        self,
        window: Window,
        batch_ids: Iterable[int],
        refs: Iterable[RecordRef],
        outputs: Any = None,
    ) -> Refused:
        """Settles the records, or with `outputs` (anything but None) stages them: they are
        settled once the shell has written the outputs (see `Staged`)."""
        if outputs is not None:
            return self._stage(window, batch_ids, refs, outputs)
        refused = Refused()
        batches: dict[Batch, None] = {}
        for batch_id in _unique(batch_ids):
            batch = window.batches.get(batch_id)
            if batch is None:
                refused.batch(batch_id, self._why_no_batch(window, batch_id))
            else:
                batches[batch] = None
        for ref in _unique(refs):
            found = self._find(window, ref)
            if isinstance(found, Refusal):
                refused.record(ref, found)
            elif found[0].batch not in batches:  # else named by its batch too: settled once
                self._settle(self._isolate(*found))
        for batch in batches:
            self._settle_batch(batch)
        self.stats.rejected += len(refused)
        return refused

    def _stage(
        self, window: Window, batch_ids: Iterable[int], refs: Iterable[RecordRef], outputs: Any
    ) -> Refused:
        batch_ids, refs = _unique(batch_ids), _unique(refs)
        if self.policy.transactional and len(self._partitions_named(window, batch_ids, refs)) > 1:
            refused = self.invalid(batch_ids, refs)
            refused.message = (
                "with transactions, an ack with outputs names records of one partition only "
                "(its outputs commit with that partition's offsets)"
            )
            return refused
        refused, targets = self._targets(window, batch_ids, refs)
        if targets:
            staged = Staged(list(targets), outputs)
            for pending in targets:
                self._unbatch(pending, "ack")
                pending.staged = staged
            self._staged.append(staged)
            self.stats.acks_with_outputs += 1
        self.stats.rejected += len(refused)
        return refused

    def _partitions_named(
        self, window: Window, batch_ids: list[int], refs: list[RecordRef]
    ) -> set[TopicPartition]:
        named = {(topic, partition) for topic, partition, _ in refs}
        for batch_id in batch_ids:
            batch = window.batches.get(batch_id)
            if batch is not None:
                named.update(pending.tp for pending in batch.records)
        return named

    def _targets(
        self, window: Window, batch_ids: list[int], refs: list[RecordRef]
    ) -> tuple[Refused, dict[Pending, None]]:
        """The runs an ack or nack names, each once (a record named by its batch and by
        itself, or twice over, is taken once), and the refused parts. Records first: cutting
        one out of its run must happen before its batch (if named too) lists the runs it
        holds."""
        refused = Refused()
        targets: dict[Pending, None] = {}
        for ref in refs:
            found = self._find(window, ref)
            if isinstance(found, Refusal):
                refused.record(ref, found)
            else:
                targets[self._isolate(*found)] = None
        for batch_id in batch_ids:
            batch = window.batches.get(batch_id)
            if batch is None:
                refused.batch(batch_id, self._why_no_batch(window, batch_id))
            else:
                targets.update(batch.records)
        return refused, targets

    def nack(
        self,
        window: Window,
        batch_ids: Iterable[int],
        refs: Iterable[RecordRef],
        *,
        dead_letter: bool,
        reason: str,
        retry_after_s: float,
        now: float,
    ) -> Refused:
        """Gives records back: to retry after a backoff (`retry_after_s`, 0 = the policy's;
        never more than its max backoff), or straight to the dead-letter topic."""
        if dead_letter and not self.policy.dead_letters:
            refused = self.invalid(batch_ids, refs)
            refused.message = "this subscription has no dead_letter topic"
            return refused
        refused, targets = self._targets(window, _unique(batch_ids), _unique(refs))
        outcome = "dead_letter" if dead_letter else "retry"
        if len(reason) > MAX_REASON:
            reason = reason[: MAX_REASON - 1] + "…"
        for pending in targets:
            self._unbatch(pending, outcome)
            if dead_letter:
                self._dead_letter(pending, reason or "nacked")
            else:
                self._retry(pending, now, retry_after_s, reason or "nacked")
        if dead_letter:
            self.stats.nacked_dead_letter += _records(targets)
        else:
            self.stats.nacked_retry += _records(targets)
        self.stats.rejected += len(refused)
        return refused

    def invalid(self, batch_ids: Iterable[int], refs: Iterable[RecordRef]) -> Refused:
        """Refuses a whole request the shell found malformed (e.g. an unknown action)."""
        refused = Refused()
        for batch_id in batch_ids:
            refused.batch(batch_id, Refusal.INVALID)
        for ref in refs:
            refused.record(ref, Refusal.INVALID)
        self.stats.rejected += len(refused)
        return refused

    def take_letters(self) -> list[Letter]:
        """Dead letters decided since the last call, for the shell to write."""
        letters, self._letters = self._letters, []
        return letters

    def dead_lettered(self, pending: Pending) -> bool:
        """The broker confirmed the record's dead-letter write: now, and only now, it is
        settled. False (and nothing changes) when the confirmation belongs to an older
        assignment of the partition."""
        part = self._parts.get(pending.tp)
        if (
            part is None
            or part.epoch != pending.epoch
            or part.out.get(pending.offset) is not pending
            or pending.batch is not None
            or pending.staged is not None
        ):
            self.stats.stale_confirmations += 1
            return False
        del part.out[pending.offset]
        self.ledger.settle_run(pending.tp, pending.offsets)
        return True

    def take_staged(self) -> list[Staged]:
        """Acks with outputs since the last call, for the shell to write."""
        staged, self._staged = self._staged, []
        return staged

    def _still_staged(self, staged: Staged) -> list[Pending]:
        """The runs of `staged` that still wait for it: not of an older assignment of their
        partition (revoked or reset since: their results are void)."""
        parts = self._parts
        return [
            pending
            for pending in staged.runs
            if pending.staged is staged
            and (part := parts.get(pending.tp)) is not None
            and part.epoch == pending.epoch
            and part.out.get(pending.offset) is pending
        ]

    def written(self, staged: Staged) -> int:
        """The outputs of `staged` are written (with transactions: committed, with the
        offsets): its records are settled now. Returns how many were (0 for a partition no
        longer held in that assignment)."""
        settled = 0
        for pending in self._still_staged(staged):
            pending.staged = None
            del self._parts[pending.tp].out[pending.offset]
            self.ledger.settle_run(pending.tp, pending.offsets)
            settled += len(pending)
        self.stats.acked += settled
        return settled

    def failed(self, staged: Staged, reason: str, now: float) -> None:
        """The outputs of `staged` could not be written: its records are delivered again
        (after a backoff, and to the DLQ once their attempts run out), as if nacked."""
        for pending in self._still_staged(staged):
            pending.staged = None
            self.stats.outputs_failed += len(pending)
            self._retry(pending, now, 0, reason)

    def released(self, staged: Staged, now: float) -> None:
        """The outputs of `staged` were not written through no fault of theirs (a transaction
        aborted for another ack's outputs, the partition's producer fenced): its records are
        delivered again at once, their attempts not held against them."""
        for pending in self._still_staged(staged):
            pending.staged = None
            self._requeue(pending, now)

    # -- dispatching ---------------------------------------------------------------------------

    def poll(self, now: float) -> Dispatch:
        """Expires ack deadlines, releases retries whose backoff is over, and fills every
        stream with room, least loaded first, as far as the batching policy says go now."""
        dispatch = Dispatch()
        self._expire(now, dispatch)
        backlog = self.backlog
        backlog.release_due(now)
        wake_at: float | None = None
        blocked = self._blocked()
        held = self._keys_out() if self.policy.keyed else None
        batch_limits = self.policy.batch
        for window in sorted(self.windows.values(), key=lambda w: w.out_records):
            while (room := window.room()) is not None:
                max_records = min(room[0], batch_limits.max_records)
                max_bytes = min(room[1], batch_limits.max_bytes)
                ready_at = backlog.ready_at(blocked, max_records, max_bytes, now)
                if ready_at is None:
                    break
                if ready_at > now:
                    wake_at = ready_at if wake_at is None else min(wake_at, ready_at)
                    break
                records = backlog.take(
                    blocked, max_records, max_bytes, oversize=not window.out_records, held=held
                )
                if not records:
                    break
                dispatch.batches.append(self._send(window, records, now))
                if self.policy.ordered:
                    blocked.update(p.tp for p in records)
        for candidate in (backlog.next_due(), self._next_deadline()):
            if candidate is not None:
                wake_at = candidate if wake_at is None else min(wake_at, candidate)
        dispatch.wake_at = wake_at
        return dispatch

    def _blocked(self) -> set[TopicPartition]:
        """Partitions that get no new deliveries now: revoking ones, and under partition
        ordering those with a record out with the app or on its way to the DLQ."""
        ordered = self.policy.ordered
        return {tp for tp, part in self._parts.items() if part.revoking or (ordered and part.out)}

    def _send(self, window: Window, records: list[Pending], now: float) -> Batch:
        batch = Batch(window.next_batch_id, window, now + self.policy.ack_deadline_s, {})
        window.next_batch_id += 1
        parts = self._parts
        count = redelivered = size = 0
        held = batch.records
        for pending in records:
            n = pending.hi - pending.lo
            if pending.attempts:
                redelivered += n
            count += n
            pending.attempts += 1
            pending.batch = batch
            held[pending] = None
            parts[pending.tp].out[pending.offset] = pending
            size += pending.size
        window.out_records += count
        window.out_bytes += size
        window.batches[batch.id] = batch
        self.stats.delivered += count
        self.stats.redelivered += redelivered
        return batch

    def _next_deadline(self) -> float | None:
        deadlines = [b.deadline for w in self.windows.values() for b in w.batches.values()]
        return min(deadlines) if deadlines else None

    def _expire(self, now: float, dispatch: Dispatch) -> None:
        """Records unsettled past the ack deadline are redelivered as if nacked."""
        for window in self.windows.values():
            for batch in [b for b in window.batches.values() if b.deadline <= now]:
                count = _records(batch.records)
                dispatch.expired.append(Expired(window, batch.id, count))
                self.stats.deadline_expired += count
                for pending in list(batch.records):
                    self._take_back(pending, batch, "deadline")
                    self._retry(pending, now, 0, "ack deadline passed")
                window._close(batch, Refusal.EXPIRED)

    # -- queries -----------------------------------------------------------------------------

    @property
    def unsettled(self) -> int:
        """Records out with the app or on their way to the DLQ: what shutdown waits for."""
        return sum(_records(part.out.values()) for part in self._parts.values())

    @property
    def in_flight(self) -> tuple[int, int, int]:
        """(batches, records, bytes) out with the app, over all streams."""
        batches = records = size = 0
        for window in self.windows.values():
            batches += len(window.batches)
            records += window.out_records
            size += window.out_bytes
        return batches, records, size

    def whereabouts(self, tp: TopicPartition, offset: int) -> str:
        """Where the record at `offset` of `tp` is, in words (for a stall's log and status)."""
        part = self._parts.get(tp)
        if part is None:
            return "its partition is not assigned here"
        for run in part.out.values():
            if run.offset <= offset <= run.last:
                batch = run.batch
                if run.staged is not None:
                    return "acked with outputs, waiting for them to be written"
                if batch is None:
                    return "on its way to the dead-letter topic, unconfirmed"
                return (
                    f"out with stream {batch.window.id} in batch {batch.id} "
                    f"(delivery attempt {run.attempts})"
                )
        found = self.backlog.find(tp, offset)
        if found is None:
            return "not fetched (fetching is paused or failing)"
        run, delayed = found
        if delayed:
            return f"waiting out a retry backoff after {run.attempts} delivery attempts"
        return "fetched, waiting for a stream with room"

    def unsettled_by_partition(self) -> dict[TopicPartition, int]:
        """Per assigned partition, records out with the app or on their way to the DLQ."""
        return {tp: _records(part.out.values()) for tp, part in self._parts.items()}

    @property
    def held_keys(self) -> int:
        """Under `ordering: key`, the keys (per partition) whose later records wait: a record
        of theirs is out with the app, on its way to the DLQ or waiting out a retry. 0 under
        the other orderings."""
        if not self.policy.keyed:
            return 0
        held = self._keys_out()
        for tp, keys in self.backlog.waiting_keys().items():
            held.setdefault(tp, set()).update(keys)
        return sum(map(len, held.values()))

    def _keys_out(self) -> dict[TopicPartition, set[bytes | None]]:
        """Per partition, the keys of records out with the app or on their way to the DLQ."""
        return {tp: {p.key for p in part.out.values()} for tp, part in self._parts.items()}

    def epoch(self, tp: TopicPartition) -> int | None:
        part = self._parts.get(tp)
        return None if part is None else part.epoch

    # -- transitions -------------------------------------------------------------------------

    def _find(self, window: Window, ref: RecordRef) -> tuple[Pending, int] | Refusal:
        """The run out with this stream holding the record, and the record's index in it."""
        topic, partition, offset = ref
        tp = (topic, partition)
        part = self._parts.get(tp)
        if part is None:
            return Refusal.REVOKED if tp in self._revoked else Refusal.UNKNOWN
        pending = part.out.get(offset)
        if pending is None:
            # Not the first of its run: the runs out are few (a batch's worth each).
            for candidate in part.out.values():
                if candidate.offset < offset <= candidate.last:
                    pending = candidate
                    break
        if pending is not None and pending.batch is not None and pending.batch.window is window:
            offsets = pending.fetch.offsets
            index = bisect_left(offsets, offset, pending.lo, pending.hi)
            if offsets[index] == offset:
                return pending, index
        ledger = self.ledger.partition(tp)
        if ledger is not None and ledger.is_settled(offset):
            return Refusal.ALREADY_SETTLED
        return Refusal.UNKNOWN

    @staticmethod
    def _why_no_batch(window: Window, batch_id: int) -> Refusal:
        if batch_id in window.closed:
            return window.closed[batch_id]
        if 0 < batch_id < window.next_batch_id:
            return Refusal.ALREADY_SETTLED
        return Refusal.UNKNOWN

    def _isolate(self, pending: Pending, index: int) -> Pending:
        """Cuts the record at `index` out of its run (the pieces stay where the run was:
        in its batch and its partition's `out`) and returns it as a run of its own."""
        if pending.lo < index:
            pending = self._split(pending, index - pending.lo)
        if pending.hi > index + 1:
            self._split(pending, 1)
        return pending

    def _split(self, pending: Pending, count: int) -> Pending:
        """`Pending.split`, keeping the pieces where the run was; returns the second."""
        tail = pending.split(count)
        if tail.batch is not None:
            tail.batch.records[tail] = None
        self._parts[tail.tp].out[tail.offset] = tail
        return tail

    def _settle(self, pending: Pending) -> None:
        self._unbatch(pending, "ack")
        del self._parts[pending.tp].out[pending.offset]
        self.ledger.settle_run(pending.tp, pending.offsets)
        self.stats.acked += len(pending)

    def _settle_batch(self, batch: Batch) -> None:
        """Every unsettled record of a batch, in one pass: the common ack, kept lean."""
        window, parts, on_end = batch.window, self._parts, self._on_end
        settle = self.ledger.settle_run
        size = settled = 0
        for pending in batch.records:
            tp = pending.tp
            del parts[tp].out[pending.offset]
            size += pending.size
            settled += pending.hi - pending.lo
            pending.batch = None
            if on_end is not None:
                on_end(pending, "ack")
            settle(tp, pending.fetch.offsets[pending.lo : pending.hi])
        window.out_records -= settled
        window.out_bytes -= size
        del window.batches[batch.id]
        self.stats.acked += settled

    def _unbatch(self, pending: Pending, outcome: str) -> None:
        """`_take_back` from the batch holding it, which ends if that emptied it."""
        batch = pending.batch
        assert batch is not None
        self._take_back(pending, batch, outcome)
        if not batch.records:
            del batch.window.batches[batch.id]

    def _take_back(self, pending: Pending, batch: Batch, outcome: str) -> None:
        """Removes a record from the batch (and stream window) holding it. The caller says
        where it goes next; an emptied batch stays in its window for the caller to end."""
        del batch.records[pending]
        pending.batch = None
        window = batch.window
        window.out_records -= pending.hi - pending.lo
        window.out_bytes -= pending.size
        if self._on_end is not None:
            self._on_end(pending, outcome)

    def _retry(self, pending: Pending, now: float, delay_s: float, reason: str) -> None:
        """Back to the backlog after a backoff, or to the DLQ once attempts run out. Its
        partition's `out` entry goes (a retry waits in the backlog) or stays (a dead letter
        is on its way)."""
        policy = self.policy
        if pending.attempts >= policy.max_attempts and policy.dead_letters:
            self._dead_letter(
                pending, f"{reason} (gave up after {pending.attempts} delivery attempts)"
            )
            return
        # Without a DLQ a record is never dropped: it keeps coming back at the max backoff.
        delay = min(delay_s, policy.max_backoff_s) if delay_s > 0 else self._backoff(pending)
        self._requeue(pending, now + delay)

    def _requeue(self, pending: Pending, not_before: float) -> None:
        del self._parts[pending.tp].out[pending.offset]
        self.backlog.retry(pending, not_before)

    def _dead_letter(self, pending: Pending, reason: str) -> None:
        """One letter per record; each stays in its partition's `out` until its write is
        confirmed."""
        letters = [pending]
        while len(pending) > 1:
            pending = self._split(pending, 1)
            letters.append(pending)
        self._letters.extend((letter, reason) for letter in letters)

    def _backoff(self, pending: Pending) -> float:
        """Exponential, capped, with jitter so a burst of nacks doesn't return as a burst."""
        policy = self.policy
        ceiling = min(
            policy.initial_backoff_s * policy.multiplier ** min(max(pending.attempts - 1, 0), 64),
            policy.max_backoff_s,
        )
        return ceiling / 2 + self._rng.uniform(0, ceiling / 2)


def _records(runs: Iterable[Pending]) -> int:
    return sum(pending.hi - pending.lo for pending in runs)


def _in_ranges(ranges: list[tuple[int, int]], offset: int) -> bool:
    """Whether a sorted list of [start, end) ranges holds `offset`; ranges wholly below it
    are consumed (offsets arrive in increasing order)."""
    while ranges and ranges[0][1] <= offset:
        ranges.pop(0)
    return bool(ranges) and ranges[0][0] <= offset


def _unique(items: Iterable[Any]) -> list[Any]:
    return list(dict.fromkeys(items))
