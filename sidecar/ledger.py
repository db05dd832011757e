"""Settlement ledger: which fetched records are settled, and which offset is safe to commit.

At-least-once delivery (docs/DESIGN.md §4.1) rests on one rule: a partition's committed offset
is the lowest offset not yet settled. Acks arrive in any order, so the commit point only moves
forward over a contiguous run of settled records.

Kafka offsets of fetched records increase strictly within a partition but are not contiguous:
transaction markers and compaction leave gaps. The ledger therefore reasons only about the
offsets it was handed and never assumes ``offset + 1`` is the next record, except after the last
tracked one (which is exactly where the consumer will fetch next).

This sits on the per-record hot path, so ``track`` and ``settle`` are O(1) amortized and memory is
O(records from the commit point up to the last tracked one): settled records below the commit
point are forgotten. The price of forgetting is that offsets below the commit point can no longer
be told apart from gaps there; both count as already settled (see ``PartitionLedger.settle``).

Pure code: no I/O, no asyncio, no Kafka client, so it can be tested exhaustively.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import TypeAlias

TopicPartition: TypeAlias = tuple[str, int]
"""(topic, partition)."""


class SettleOutcome(enum.Enum):
    """What a settlement did, so callers can tell a first ack from a duplicate or a stray."""

    SETTLED = "settled"
    """The record was owed a settlement and now has it."""
    ALREADY_SETTLED = "already_settled"
    """Nothing owed here any more: a duplicate ack, or an offset below the commit point."""
    UNKNOWN = "unknown"
    """This ledger never handed out the offset (a gap, not fetched yet, or another assignment)."""


# Module constants spare the hot path an attribute lookup per call.
_SETTLED = SettleOutcome.SETTLED
_ALREADY_SETTLED = SettleOutcome.ALREADY_SETTLED
_UNKNOWN = SettleOutcome.UNKNOWN


@dataclass(frozen=True, slots=True)
class CommitPoint:
    """One partition's commit, as `PartitionLedger.commit_point` works it out."""

    offset: int
    #: The settled ranges above `offset`, encoded (see `encode_settled`).
    metadata: str
    #: Settled records above `offset` (`PartitionLedger.settled_above` once it is committed).
    settled_above: int
    #: Whether `metadata` holds every settled range (else it was cut at `METADATA_LIMIT`).
    complete: bool


class PartitionLedger:
    """Settlement state of one partition for one assignment.

    Holds only the *window*: the tracked records from the commit point (the lowest unsettled
    one) up to the last tracked. ``_order`` lists the window's offsets in order so the head can be
    popped in O(1); ``_window`` maps each of them to whether it is settled, so a settle finds its
    record in O(1) and a gap (absent from the map) is recognised as such. Invariant: the window is
    empty or its first record is unsettled, so the commit point is read off in O(1).
    """

    __slots__ = ("_next", "_order", "_start", "_unsettled", "_window")

    def __init__(self, start_offset: int) -> None:
        """``start_offset`` is where the consumer fetches from: the committed offset, or the reset
        point. Nothing below it was handed out by this ledger, so nothing below it can be settled
        here."""
        if start_offset < 0:
            raise ValueError(f"start offset must be a real position (>= 0), got {start_offset}")
        self._start = start_offset
        self._next = start_offset
        self._order: deque[int] = deque()
        self._window: dict[int, bool] = {}
        self._unsettled = 0

    def track(self, offset: int) -> None:
        """Record that the record at ``offset`` was fetched and is now owed a settlement.

        Raises ValueError unless ``offset`` is above every tracked offset and at or above the
        start offset: an offset out of order means the consumer was repositioned without a new
        assignment, and silently accepting it could commit past records never delivered.
        """
        if offset < self._next:
            if self._next != self._start:
                raise ValueError(
                    f"offset {offset} tracked out of order: expected >= {self._next} "
                    "(after the last tracked offset)"
                )
            raise ValueError(f"offset {offset} is below the start offset {self._start}")
        self._order.append(offset)
        self._window[offset] = False
        self._next = offset + 1
        self._unsettled += 1

    def track_run(self, offsets: list[int]) -> None:
        """`track` for the records of one fetch at once (ascending offsets, as fetched): the
        common case, kept to a few bulk operations instead of a call per record."""
        if not offsets:
            return
        if offsets[0] < self._next:
            self.track(offsets[0])  # raises the error `track` would
        self._order.extend(offsets)
        self._window.update(dict.fromkeys(offsets, False))
        self._next = offsets[-1] + 1
        self._unsettled += len(offsets)

    def settle_run(self, offsets: list[int]) -> None:
        """`settle` for a run of records that are tracked, unsettled and next to each other in
        tracking order (a slice of one fetch, as the in-flight state machine hands them out):
        a batch acked whole costs a few bulk operations, not a call per record.

        Raises ValueError, changing nothing, when the run is not that: a caller bug that must
        not move the commit point over a record it never settled."""
        window = self._window
        first, last = offsets[0], offsets[-1]
        if window.get(first) is not False or window.get(last) is not False:
            raise ValueError(f"run {first}..{last} is not tracked and unsettled")
        order = self._order
        if order[0] == first and order[len(offsets) - 1] == last:
            popleft = order.popleft
            for _ in offsets:
                del window[popleft()]
        else:
            window.update(dict.fromkeys(offsets, True))
        self._unsettled -= len(offsets)
        while order and window[order[0]]:
            del window[order.popleft()]

    def settle(self, offset: int) -> SettleOutcome:
        """Settle the record at ``offset`` (acked, or dead-lettered with the DLQ write confirmed).

        - SETTLED: it was tracked and unsettled; the commit point may now move forward.
        - ALREADY_SETTLED: settled before, or anywhere in [start offset, commit point). Below the
          commit point this ledger keeps no per-offset memory, so a never-tracked gap there is
          reported the same way; that is harmless because nothing is owed there and the commit
          point cannot move because of it.
        - UNKNOWN: never handed out by this ledger: below the start offset (e.g. a late ack from a
          previous assignment), a gap at or above the commit point, or not yet tracked. A settle
          before its track changes nothing: the record is owed once it is tracked.
        """
        window = self._window
        settled = window.get(offset)
        if settled is None:
            if self._start <= offset < self.commit_offset():
                return _ALREADY_SETTLED
            return _UNKNOWN
        if settled:
            return _ALREADY_SETTLED
        self._unsettled -= 1
        order = self._order
        if offset != order[0]:
            window[offset] = True
            return _SETTLED
        # The head was settled: drop it and every settled record right behind it.
        del window[order.popleft()]
        while order and window[order[0]]:
            del window[order.popleft()]
        return _SETTLED

    def is_settled(self, offset: int) -> bool:
        """Whether nothing is owed at ``offset``; true exactly when ``settle(offset)`` would
        answer ALREADY_SETTLED, so a check-then-settle caller sees one consistent story."""
        settled = self._window.get(offset)
        if settled is None:
            return self._start <= offset < self.commit_offset()
        return settled

    def commit_offset(self) -> int:
        """The offset safe to commit: the lowest tracked unsettled offset, or if every tracked
        record is settled, where the consumer fetches next (last tracked + 1, or the start)."""
        return self._order[0] if self._order else self._next

    def settled_ranges(self) -> list[tuple[int, int]]:
        """Settled records above the commit point, as [start, end) ranges of offsets.

        What the committed offset alone cannot say: acks that arrived out of order, above a
        record still out with the app. A range may span gaps (transaction markers, compacted
        offsets): nothing there to deliver, so skipping them again is harmless.
        """
        return self._window_if(())[1]

    def commit_point(self, also_settled: Collection[int] = ()) -> CommitPoint:
        """What to commit: the offset, and the metadata naming the settled ranges above it.

        `also_settled` are tracked, unsettled offsets to count as settled: records whose
        settlement commits with this very commit (ack outputs in the same Kafka transaction),
        so the commit must already step over them, and the next owner skip them."""
        offset, ranges, above = self._window_if(also_settled)
        metadata = encode_settled(offset, ranges)
        return CommitPoint(
            offset, metadata, above, not ranges or metadata.count(",") + 1 == len(ranges)
        )

    def _window_if(self, also: Collection[int]) -> tuple[int, list[tuple[int, int]], int]:
        """(commit offset, settled ranges above it, records in them), with the offsets in
        `also` counted as settled."""
        window = self._window
        commit: int | None = None
        ranges: list[tuple[int, int]] = []
        start: int | None = None
        end = above = 0
        for offset in self._order:
            settled = window[offset] or offset in also
            if commit is None:
                if not settled:
                    commit = offset
            elif settled:
                above += 1
                if start is None:
                    start = offset
                end = offset + 1
            elif start is not None:
                ranges.append((start, end))
                start = None
        if start is not None:
            ranges.append((start, end))
        return (self._next if commit is None else commit), ranges, above

    @property
    def settled_above(self) -> int:
        """How many records above the commit point are settled (cheap change detection for
        `settled_ranges`)."""
        return len(self._window) - self._unsettled

    @property
    def unsettled(self) -> int:
        """Tracked records still owed a settlement."""
        return self._unsettled

    @property
    def span(self) -> int:
        """Tracked records from the commit point on, settled or not: what one record held
        at the commit point makes this ledger (and the commit metadata) remember."""
        return len(self._window)

    @property
    def next_offset(self) -> int:
        """Last tracked offset + 1, or the start offset when nothing was tracked."""
        return self._next


class Ledger:
    """Settlement state of every partition assigned to one consumer.

    Also remembers, per partition, the last offset the broker confirmed as committed (initially
    the assigned start offset), so ``pending_commits`` only offers offsets that moved and a late
    or stale confirmation can never move a partition's committed offset backwards or past an
    unsettled record.
    """

    __slots__ = ("_committed", "_committed_above", "_partitions")

    def __init__(self) -> None:
        self._partitions: dict[TopicPartition, PartitionLedger] = {}
        self._committed: dict[TopicPartition, int] = {}
        #: `settled_above` when the last commit was confirmed: a change means the commit's
        #: metadata (the settled ranges) is worth writing again.
        self._committed_above: dict[TopicPartition, int] = {}

    def assign(self, tp: TopicPartition, start_offset: int) -> None:
        """Start a fresh ledger for ``tp`` at ``start_offset``, replacing any previous one.

        A reassignment starts from scratch on purpose: records of the previous assignment may
        have been redelivered to another consumer and must be tracked anew.
        """
        self._partitions[tp] = PartitionLedger(start_offset)
        self._committed[tp] = start_offset
        self._committed_above[tp] = 0

    def revoke(self, tp: TopicPartition) -> PartitionLedger | None:
        """Forget ``tp``; returns its ledger (None if it was not assigned) so the caller can still
        read its final commit point and what was left unsettled."""
        self._committed.pop(tp, None)
        self._committed_above.pop(tp, None)
        return self._partitions.pop(tp, None)

    def partition(self, tp: TopicPartition) -> PartitionLedger | None:
        """The ledger of ``tp``, or None if it is not assigned."""
        return self._partitions.get(tp)

    def track(self, tp: TopicPartition, offset: int) -> None:
        """Track a fetched record. Raises KeyError if ``tp`` is not assigned, because fetching
        for a partition this consumer does not own is a bug upstream, not a race to absorb."""
        self._partitions[tp].track(offset)

    def track_run(self, tp: TopicPartition, offsets: list[int]) -> None:
        """`track` for the records of one fetch at once (see `PartitionLedger.track_run`)."""
        self._partitions[tp].track_run(offsets)

    def settle_run(self, tp: TopicPartition, offsets: list[int]) -> None:
        """`settle` for a run of tracked, unsettled records (see
        `PartitionLedger.settle_run`); nothing for a partition not assigned."""
        ledger = self._partitions.get(tp)
        if ledger is not None:
            ledger.settle_run(offsets)

    def settle(self, tp: TopicPartition, offset: int) -> SettleOutcome:
        """Settle a record. UNKNOWN if ``tp`` is not assigned: acks for revoked partitions are
        expected (the app finishes in-flight work) and must not resurrect anything."""
        ledger = self._partitions.get(tp)
        if ledger is None:
            return _UNKNOWN
        return ledger.settle(offset)

    def pending_commits(self) -> dict[TopicPartition, int]:
        """Offsets worth committing: the partitions whose commit point moved past the last
        confirmed commit (or the start offset), or whose settled records above it changed (their
        ranges go into the commit's metadata), so idle partitions cost no commit traffic."""
        committed, above = self._committed, self._committed_above
        pending: dict[TopicPartition, int] = {}
        for tp, ledger in self._partitions.items():
            offset = ledger.commit_offset()
            if offset > committed[tp] or ledger.settled_above != above[tp]:
                pending[tp] = offset
        return pending

    def mark_committed(
        self,
        offsets: Mapping[TopicPartition, int],
        settled_above: Mapping[TopicPartition, int] | None = None,
    ) -> None:
        """Record offsets the broker confirmed as committed.

        `settled_above` is each partition's `settled_above` when the commit was issued (its
        metadata was built then): records settled during the commit's round trip are not in
        it, so they must still count as a change worth committing. Without it, now is
        assumed, which is right only when nothing was settled meanwhile.

        Ignored per partition: not assigned any more (a confirmation that raced a revoke), not
        above what is already recorded (confirmations may complete out of order), or beyond the
        partition's commit point. The last can only come from a commit issued for a previous
        assignment of the partition; recording it would claim records of this assignment are
        safe before they are settled.
        """
        committed = self._committed
        for tp, offset in offsets.items():
            ledger = self._partitions.get(tp)
            if ledger is not None and committed[tp] <= offset <= ledger.commit_offset():
                committed[tp] = offset
                self._committed_above[tp] = (
                    settled_above[tp]
                    if settled_above is not None and tp in settled_above
                    else ledger.settled_above
                )

    def committed(self, tp: TopicPartition) -> int | None:
        """The last confirmed commit of ``tp`` in this assignment (initially its start offset),
        or None if it is not assigned."""
        return self._committed.get(tp)

    @property
    def unsettled(self) -> int:
        """Records still owed a settlement, over all assigned partitions."""
        return sum(ledger.unsettled for ledger in self._partitions.values())

    def partitions(self) -> list[TopicPartition]:
        """The assigned partitions."""
        return list(self._partitions)


#: Marks commit metadata written by this ledger; anything else (other tools, resets) is
#: ignored, so it can never make records be skipped.
METADATA_PREFIX = "ks1:"
#: Kafka keeps at most offset.metadata.max.bytes (4096 by default) of commit metadata.
METADATA_LIMIT = 3000


def encode_settled(commit_offset: int, ranges: list[tuple[int, int]]) -> str:
    """Commit metadata for settled ranges above `commit_offset`: "ks1:" then
    `start+length` pairs, starts relative to the previous range's end. Ranges that do not fit
    are left out: that only means more redelivery, never a lost record."""
    parts: list[str] = []
    size = len(METADATA_PREFIX)
    previous = commit_offset
    for start, end in ranges:
        part = f"{start - previous}+{end - start}"
        if size + len(part) + 1 > METADATA_LIMIT:
            break
        parts.append(part)
        size += len(part) + 1
        previous = end
    return METADATA_PREFIX + ",".join(parts) if parts else ""


def decode_settled(commit_offset: int, metadata: str) -> list[tuple[int, int]]:
    """The settled ranges a commit's metadata carries; [] for anything not written by
    `encode_settled` (never trust a guess: a wrong range would skip a record)."""
    if not metadata.startswith(METADATA_PREFIX):
        return []
    ranges: list[tuple[int, int]] = []
    previous = commit_offset
    try:
        for part in metadata[len(METADATA_PREFIX) :].split(","):
            gap, _, length = part.partition("+")
            start = previous + int(gap)
            end = start + int(length)
            if int(gap) < 0 or end <= start:
                return []
            ranges.append((start, end))
            previous = end
    except ValueError:
        return []
    return ranges
