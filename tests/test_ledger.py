"""The settlement ledger: the commit point never passes an unsettled record (at-least-once,
docs/DESIGN.md §4.1), checked case by case and against a deliberately naive reference model."""

from __future__ import annotations

import itertools
import random
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from sidecar.ledger import (
    METADATA_LIMIT,
    METADATA_PREFIX,
    Ledger,
    PartitionLedger,
    SettleOutcome,
    TopicPartition,
    decode_settled,
    encode_settled,
)

SETTLED = SettleOutcome.SETTLED
ALREADY = SettleOutcome.ALREADY_SETTLED
UNKNOWN = SettleOutcome.UNKNOWN

A0: TopicPartition = ("a", 0)
A1: TopicPartition = ("a", 1)
B0: TopicPartition = ("b", 0)


def tracked(start: int, *offsets: int) -> PartitionLedger:
    ledger = PartitionLedger(start)
    for offset in offsets:
        ledger.track(offset)
    return ledger


class PartitionModel:
    """The reference: keeps every tracked offset and recomputes everything in O(n), so it is
    obviously right where the ledger is clever. It spells out the ledger's one deliberate
    imprecision: below the commit point, never-tracked offsets count as already settled."""

    def __init__(self, start: int) -> None:
        self.start = start
        self.tracked: list[int] = []
        self.settled: set[int] = set()

    def next_candidate(self, gap: int) -> int:
        """A valid next offset: ``gap`` after the last tracked one, or ``gap - 1`` after the
        start so the first record may sit right at the start offset."""
        return self.tracked[-1] + gap if self.tracked else self.start + gap - 1

    def unsettled_offsets(self) -> list[int]:
        return [offset for offset in self.tracked if offset not in self.settled]

    @property
    def unsettled(self) -> int:
        return len(self.unsettled_offsets())

    @property
    def next_offset(self) -> int:
        return self.tracked[-1] + 1 if self.tracked else self.start

    def commit_offset(self) -> int:
        return min(self.unsettled_offsets(), default=self.next_offset)

    def outcome(self, offset: int) -> SettleOutcome:
        if offset in self.tracked and offset not in self.settled:
            return SETTLED
        if offset in self.settled or self.start <= offset < self.commit_offset():
            return ALREADY
        return UNKNOWN

    def track(self, offset: int) -> None:
        self.tracked.append(offset)

    def settle(self, offset: int) -> None:
        if offset in self.tracked:
            self.settled.add(offset)


# PartitionLedger, case by case


def test_nothing_tracked_commits_the_start_offset() -> None:
    ledger = PartitionLedger(42)
    assert ledger.commit_offset() == 42
    assert ledger.next_offset == 42
    assert ledger.unsettled == 0


def test_start_offset_must_be_a_real_position() -> None:
    with pytest.raises(ValueError, match="start offset"):
        PartitionLedger(-1)


def test_track_owes_a_settlement_and_holds_the_commit() -> None:
    ledger = tracked(0, 0, 1, 2)
    assert ledger.unsettled == 3
    assert ledger.commit_offset() == 0
    assert ledger.next_offset == 3


def test_a_gap_before_the_first_record_is_committed_over() -> None:
    """Offsets 10..14 were transaction markers: nothing is owed there, so once 15 is fetched
    the commit point is 15, not the start offset."""
    ledger = tracked(10, 15)
    assert ledger.commit_offset() == 15


def test_track_rejects_offsets_below_the_start() -> None:
    ledger = PartitionLedger(10)
    with pytest.raises(ValueError, match="below the start offset 10"):
        ledger.track(9)
    assert ledger.unsettled == 0
    assert ledger.commit_offset() == 10


@pytest.mark.parametrize("offset", [5, 4, 0])
def test_track_rejects_repeated_or_backward_offsets(offset: int) -> None:
    ledger = tracked(0, 3, 5)
    with pytest.raises(ValueError, match="out of order: expected >= 6"):
        ledger.track(offset)
    assert ledger.unsettled == 2
    assert ledger.next_offset == 6


def test_track_rejects_backward_offsets_even_when_all_is_settled() -> None:
    ledger = tracked(0, 0, 1)
    ledger.settle(0)
    ledger.settle(1)
    with pytest.raises(ValueError, match="out of order"):
        ledger.track(1)


def test_in_order_settles_move_the_commit_one_by_one() -> None:
    ledger = tracked(0, 0, 1, 2)
    assert ledger.settle(0) is SETTLED
    assert ledger.commit_offset() == 1
    assert ledger.settle(1) is SETTLED
    assert ledger.commit_offset() == 2
    assert ledger.settle(2) is SETTLED
    assert ledger.commit_offset() == 3
    assert ledger.unsettled == 0


def test_out_of_order_settles_wait_for_the_head_then_jump_the_run() -> None:
    ledger = tracked(0, 0, 1, 2, 3, 4)
    assert ledger.settle(3) is SETTLED
    assert ledger.settle(1) is SETTLED
    assert ledger.settle(2) is SETTLED
    assert ledger.commit_offset() == 0
    assert ledger.unsettled == 2
    assert ledger.settle(0) is SETTLED
    assert ledger.commit_offset() == 4
    assert ledger.unsettled == 1


def test_gaps_are_skipped_without_offset_arithmetic() -> None:
    ledger = tracked(0, 0, 3, 7)
    ledger.settle(0)
    assert ledger.commit_offset() == 3
    ledger.settle(7)
    assert ledger.commit_offset() == 3
    ledger.settle(3)
    assert ledger.commit_offset() == 8


def test_all_settled_commits_after_the_last_tracked_record() -> None:
    ledger = tracked(100, 101, 250, 251, 900)
    for offset in (900, 251, 101, 250):
        ledger.settle(offset)
    assert ledger.commit_offset() == 901
    assert ledger.next_offset == 901
    assert ledger.unsettled == 0


def test_tracking_after_everything_settled_holds_the_commit_again() -> None:
    ledger = tracked(0, 0)
    ledger.settle(0)
    ledger.track(5)
    assert ledger.commit_offset() == 5
    assert ledger.unsettled == 1


def test_double_settle_is_reported_and_changes_nothing() -> None:
    ledger = tracked(0, 0, 1, 2)
    assert ledger.settle(2) is SETTLED
    assert ledger.settle(2) is ALREADY
    assert ledger.unsettled == 2
    assert ledger.commit_offset() == 0
    assert ledger.settle(0) is SETTLED
    assert ledger.settle(0) is ALREADY
    assert ledger.unsettled == 1
    assert ledger.commit_offset() == 1


def test_gap_at_or_above_the_commit_point_is_unknown() -> None:
    ledger = tracked(0, 0, 3, 7)
    ledger.settle(0)
    assert ledger.settle(5) is UNKNOWN
    assert ledger.settle(4) is UNKNOWN
    assert not ledger.is_settled(5)
    assert ledger.unsettled == 2
    assert ledger.commit_offset() == 3


def test_beyond_the_last_tracked_is_unknown() -> None:
    ledger = tracked(0, 0, 1)
    assert ledger.settle(2) is UNKNOWN
    assert ledger.settle(10**12) is UNKNOWN
    assert ledger.unsettled == 2


def test_settle_before_track_does_not_presettle() -> None:
    ledger = tracked(0, 0)
    assert ledger.settle(1) is UNKNOWN
    ledger.track(1)
    assert ledger.unsettled == 2
    ledger.settle(0)
    assert ledger.commit_offset() == 1
    assert ledger.settle(1) is SETTLED
    assert ledger.commit_offset() == 2


def test_settle_on_an_empty_ledger_is_unknown() -> None:
    ledger = PartitionLedger(5)
    assert ledger.settle(5) is UNKNOWN
    assert ledger.settle(4) is UNKNOWN
    assert ledger.commit_offset() == 5


def test_below_the_start_offset_is_unknown() -> None:
    """A late ack from a previous assignment: never handed out by this ledger."""
    ledger = tracked(10, 10, 11)
    ledger.settle(10)
    ledger.settle(11)
    assert ledger.settle(9) is UNKNOWN
    assert ledger.settle(0) is UNKNOWN
    assert not ledger.is_settled(9)


def test_below_the_commit_point_is_already_settled_tracked_or_not() -> None:
    """The documented trade-off for O(window) memory: below the commit point the ledger keeps
    nothing per offset, so a tracked record and a gap there both read as already settled."""
    ledger = tracked(10, 10, 12, 13, 20)
    for offset in (10, 12, 13):
        ledger.settle(offset)
    assert ledger.commit_offset() == 20
    for offset in (10, 12, 13):  # tracked, settled, below the commit point
        assert ledger.settle(offset) is ALREADY
        assert ledger.is_settled(offset)
    for offset in (11, 14, 19):  # gaps below the commit point
        assert ledger.settle(offset) is ALREADY
        assert ledger.is_settled(offset)
    assert ledger.unsettled == 1
    assert ledger.commit_offset() == 20


def test_below_the_first_record_counts_as_below_the_commit_point() -> None:
    ledger = tracked(10, 15)
    assert ledger.settle(12) is ALREADY
    assert ledger.settle(15) is SETTLED


def test_is_settled_agrees_with_settle() -> None:
    ledger = tracked(0, 0, 2, 4)
    ledger.settle(2)
    assert not ledger.is_settled(0)  # tracked, unsettled head
    assert ledger.is_settled(2)  # settled above the head
    assert not ledger.is_settled(3)  # gap above the head
    assert not ledger.is_settled(4)  # tracked, unsettled
    assert not ledger.is_settled(5)  # not tracked yet
    ledger.settle(0)
    assert ledger.is_settled(0)
    assert ledger.is_settled(1)  # gap below the commit point


def test_memory_stays_bounded_by_the_unsettled_window() -> None:
    """Records settled below the commit point are forgotten: after 100k records, each settled
    in place or shuffled within windows of 100, the ledger holds about what it held empty."""
    rng = random.Random(7)
    ledger = PartitionLedger(0)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for base in range(0, 100_000, 100):
            window = list(range(base, base + 100))
            for offset in window:
                ledger.track(offset)
            rng.shuffle(window)
            for offset in window:
                ledger.settle(offset)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert ledger.commit_offset() == 100_000
    assert held < 32_000  # O(all records) would be megabytes


# Ledger, case by case


def test_assign_starts_a_partition_at_its_start_offset() -> None:
    ledger = Ledger()
    ledger.assign(A0, 7)
    part = ledger.partition(A0)
    assert part is not None
    assert part.commit_offset() == 7
    assert ledger.committed(A0) == 7
    assert ledger.partitions() == [A0]
    assert ledger.pending_commits() == {}


def test_unassigned_partitions_are_absent() -> None:
    ledger = Ledger()
    assert ledger.partition(A0) is None
    assert ledger.committed(A0) is None
    assert ledger.partitions() == []
    assert ledger.unsettled == 0


def test_track_on_an_unassigned_partition_raises() -> None:
    ledger = Ledger()
    ledger.assign(A0, 0)
    with pytest.raises(KeyError):
        ledger.track(A1, 0)


def test_settle_on_an_unassigned_partition_is_unknown() -> None:
    ledger = Ledger()
    ledger.assign(A0, 0)
    ledger.track(A0, 0)
    assert ledger.settle(A1, 0) is UNKNOWN
    assert ledger.unsettled == 1


def test_track_and_settle_go_to_the_partition() -> None:
    ledger = Ledger()
    ledger.assign(A0, 0)
    ledger.assign(A1, 50)
    ledger.track(A0, 0)
    ledger.track(A1, 50)
    ledger.track(A1, 52)
    assert ledger.unsettled == 3
    assert ledger.settle(A1, 50) is SETTLED
    assert ledger.settle(A1, 50) is ALREADY
    assert ledger.unsettled == 2
    assert sorted(ledger.partitions()) == [A0, A1]


def test_pending_commits_lists_only_partitions_that_moved() -> None:
    ledger = Ledger()
    ledger.assign(A0, 0)
    ledger.assign(A1, 0)
    ledger.assign(B0, 9)
    ledger.track(A0, 0)
    ledger.track(A0, 1)
    ledger.track(A1, 0)
    ledger.track(B0, 9)
    assert ledger.pending_commits() == {}
    ledger.settle(A0, 1)
    # Out of order: the head still holds the offset, but the settled range above it is news
    # (it goes into the commit's metadata), so the same offset is offered again.
    assert ledger.pending_commits() == {A0: 0}
    ledger.mark_committed({A0: 0})
    assert ledger.pending_commits() == {}
    ledger.settle(A0, 0)
    ledger.settle(B0, 9)
    assert ledger.pending_commits() == {A0: 2, B0: 10}


def test_pending_commits_includes_a_gap_before_the_first_record() -> None:
    """Committing over leading transaction markers saves refetching them after a restart."""
    ledger = Ledger()
    ledger.assign(A0, 10)
    ledger.track(A0, 15)
    assert ledger.pending_commits() == {A0: 15}


def test_mark_committed_clears_pending_until_the_commit_point_moves_again() -> None:
    ledger = Ledger()
    ledger.assign(A0, 0)
    for offset in range(3):
        ledger.track(A0, offset)
    ledger.settle(A0, 0)
    ledger.mark_committed(ledger.pending_commits())
    assert ledger.committed(A0) == 1
    assert ledger.pending_commits() == {}
    ledger.settle(A0, 1)
    assert ledger.pending_commits() == {A0: 2}


def test_mark_committed_never_moves_backwards() -> None:
    """Two commits in flight may be confirmed in either order."""
    ledger = Ledger()
    ledger.assign(A0, 0)
    for offset in range(4):
        ledger.track(A0, offset)
    ledger.settle(A0, 0)
    first = ledger.pending_commits()
    ledger.settle(A0, 1)
    second = ledger.pending_commits()
    ledger.mark_committed(second)
    ledger.mark_committed(first)
    assert ledger.committed(A0) == 2
    assert ledger.pending_commits() == {}


def test_mark_committed_ignores_unassigned_partitions() -> None:
    ledger = Ledger()
    ledger.assign(A0, 0)
    ledger.track(A0, 0)
    ledger.settle(A0, 0)
    pending = ledger.pending_commits()
    ledger.revoke(A0)
    ledger.mark_committed({**pending, B0: 5})
    assert ledger.committed(A0) is None
    assert ledger.committed(B0) is None
    assert ledger.partitions() == []


def test_mark_committed_ignores_offsets_beyond_the_commit_point() -> None:
    """A commit of the previous assignment confirmed after the partition came back must not
    claim this assignment's unsettled records as safe."""
    ledger = Ledger()
    ledger.assign(A0, 0)
    for offset in range(10):
        ledger.track(A0, offset)
        ledger.settle(A0, offset)
    stale = ledger.pending_commits()
    ledger.revoke(A0)
    ledger.assign(A0, 5)
    ledger.track(A0, 5)
    ledger.mark_committed(stale)
    assert ledger.committed(A0) == 5
    ledger.settle(A0, 5)
    ledger.mark_committed(stale)  # commit point is 6 now: still beyond it
    assert ledger.committed(A0) == 5
    assert ledger.pending_commits() == {A0: 6}


def test_acks_during_a_commit_round_trip_are_committed_next_time() -> None:
    ledger = Ledger()
    ledger.assign(A0, 0)
    for offset in range(4):
        ledger.track(A0, offset)
    ledger.settle(A0, 1)
    issued = ledger.pending_commits()
    above = {A0: 1}  # what the commit's metadata described when it was sent
    ledger.settle(A0, 2)  # acked while the commit was on its way
    ledger.mark_committed(issued, above)
    assert ledger.pending_commits() == {A0: 0}  # offset 2 must reach the metadata too


def test_revoke_returns_the_old_ledger_and_forgets_the_partition() -> None:
    ledger = Ledger()
    ledger.assign(A0, 0)
    ledger.assign(A1, 0)
    ledger.track(A0, 0)
    ledger.track(A0, 1)
    ledger.settle(A0, 0)
    before = ledger.partition(A0)
    revoked = ledger.revoke(A0)
    assert revoked is before
    assert revoked is not None
    assert revoked.commit_offset() == 1
    assert revoked.unsettled == 1
    assert ledger.partitions() == [A1]
    assert ledger.partition(A0) is None
    assert ledger.committed(A0) is None
    assert ledger.unsettled == 0
    assert ledger.settle(A0, 1) is UNKNOWN  # acks for revoked records are rejected
    assert ledger.pending_commits() == {}


def test_revoke_of_an_unassigned_partition_returns_none() -> None:
    ledger = Ledger()
    assert ledger.revoke(A0) is None
    ledger.assign(A0, 0)
    ledger.revoke(A0)
    assert ledger.revoke(A0) is None


def test_reassign_starts_from_scratch() -> None:
    """Records of the previous assignment may have gone to another consumer: they are owed
    again only when fetched again."""
    ledger = Ledger()
    ledger.assign(A0, 0)
    ledger.track(A0, 0)
    ledger.track(A0, 1)
    ledger.settle(A0, 0)
    ledger.mark_committed(ledger.pending_commits())
    old = ledger.revoke(A0)
    ledger.assign(A0, 1)
    part = ledger.partition(A0)
    assert part is not None
    assert part is not old
    assert part.unsettled == 0
    assert part.commit_offset() == 1
    assert ledger.committed(A0) == 1
    assert ledger.settle(A0, 1) is UNKNOWN  # not fetched again yet
    ledger.track(A0, 1)
    assert ledger.settle(A0, 1) is SETTLED


def test_assign_over_an_assigned_partition_replaces_it() -> None:
    ledger = Ledger()
    ledger.assign(A0, 0)
    ledger.track(A0, 0)
    ledger.assign(A0, 3)
    assert ledger.unsettled == 0
    assert ledger.committed(A0) == 3
    assert ledger.partitions() == [A0]


# PartitionLedger against the model, property-based

GAPS = st.one_of(st.just(1), st.integers(2, 6))
STARTS = st.one_of(st.integers(0, 20), st.integers(0, 2**62))
OPS = st.sampled_from(["track", "track", "settle_unsettled", "settle_tracked", "settle_any"])
# Short runs shrink well; long ones reach deep windows of out-of-order settles.
OP_LISTS = st.one_of(st.lists(OPS, max_size=20), st.lists(OPS, min_size=40, max_size=150))


def check_against_model(ledger: PartitionLedger, model: PartitionModel, previous: int) -> int:
    """Invariants that must hold after every step; returns the commit point."""
    commit = ledger.commit_offset()
    assert all(commit <= offset for offset in model.unsettled_offsets())  # never passes one
    assert commit >= previous  # never goes backwards
    assert commit == model.commit_offset()
    assert ledger.unsettled == model.unsettled
    assert ledger.next_offset == model.next_offset
    if model.tracked and not model.unsettled:
        assert commit == model.tracked[-1] + 1
    return commit


def settle_both(ledger: PartitionLedger, model: PartitionModel, offset: int) -> None:
    expected = model.outcome(offset)
    assert ledger.is_settled(offset) == (expected is ALREADY)
    assert ledger.settle(offset) is expected
    assert ledger.is_settled(offset) == (expected is not UNKNOWN)
    model.settle(offset)


@settings(max_examples=500, deadline=None)
@given(start=STARTS, data=st.data())
def test_partition_ledger_matches_the_model(start: int, data: st.DataObject) -> None:
    ledger = PartitionLedger(start)
    model = PartitionModel(start)
    commit = check_against_model(ledger, model, start)
    for op in data.draw(OP_LISTS, label="ops"):
        if op == "track":
            offset = model.next_candidate(data.draw(GAPS, label="gap"))
            ledger.track(offset)
            model.track(offset)
        else:
            if op == "settle_unsettled" and model.unsettled:
                choices = st.sampled_from(model.unsettled_offsets())
            elif op == "settle_tracked" and model.tracked:
                choices = st.sampled_from(model.tracked)
            else:
                choices = st.integers(start - 3, model.next_offset + 3)
            settle_both(ledger, model, data.draw(choices, label="settle"))
        commit = check_against_model(ledger, model, commit)

    for offset in range(start - 3, model.next_offset + 3):
        assert ledger.is_settled(offset) == (model.outcome(offset) is ALREADY)
    for offset in data.draw(st.permutations(model.unsettled_offsets()), label="drain"):
        settle_both(ledger, model, offset)
        commit = check_against_model(ledger, model, commit)
    assert ledger.unsettled == 0
    assert commit == model.next_offset


# Ledger against the model, stateful

PARTITIONS = [A0, A1, B0]


class LedgerMachine(RuleBasedStateMachine):
    """Random interleavings of fetches, acks, commits (requested, then confirmed in any order,
    possibly after the partition was revoked or reassigned), and rebalances."""

    def __init__(self) -> None:
        super().__init__()
        self.ledger = Ledger()
        self.models: dict[TopicPartition, PartitionModel] = {}
        self.committed: dict[TopicPartition, int] = {}
        self.generation: dict[TopicPartition, int] = dict.fromkeys(PARTITIONS, 0)
        self.in_flight: list[tuple[dict[TopicPartition, int], dict[TopicPartition, int]]] = []
        self.last_committed: dict[TopicPartition, int] = {}

    @initialize(
        starts=st.lists(st.integers(0, 30), min_size=2, max_size=2),
        fetched=st.lists(st.lists(GAPS, max_size=8), min_size=2, max_size=2),
    )
    def assign_and_fetch(self, starts: list[int], fetched: list[list[int]]) -> None:
        """Two partitions assigned with records in flight, one unassigned: Hypothesis switches
        random rules off per run, and every run should still have acks and commits to make."""
        for tp, start, gaps in zip(PARTITIONS, starts, fetched, strict=False):
            self.assign(tp, start)
            self.fetch_into(tp, gaps)

    @rule(tp=st.sampled_from(PARTITIONS), start=st.integers(0, 30))
    def assign(self, tp: TopicPartition, start: int) -> None:
        self.ledger.assign(tp, start)
        self.models[tp] = PartitionModel(start)
        self.committed[tp] = start
        self.last_committed[tp] = start
        self.generation[tp] += 1

    @rule(tp=st.sampled_from(PARTITIONS))
    def revoke(self, tp: TopicPartition) -> None:
        before = self.ledger.partition(tp)
        revoked = self.ledger.revoke(tp)
        assert revoked is before
        model = self.models.pop(tp, None)
        if model is None:
            assert revoked is None
            return
        assert revoked is not None
        assert revoked.commit_offset() == model.commit_offset()
        assert revoked.unsettled == model.unsettled
        del self.committed[tp], self.last_committed[tp]

    @precondition(lambda self: self.models)
    @rule(data=st.data(), gaps=st.lists(GAPS, min_size=1, max_size=5))
    def fetch(self, data: st.DataObject, gaps: list[int]) -> None:
        self.fetch_into(data.draw(st.sampled_from(sorted(self.models)), label="tp"), gaps)

    def fetch_into(self, tp: TopicPartition, gaps: list[int]) -> None:
        model = self.models[tp]
        for gap in gaps:
            offset = model.next_candidate(gap)
            self.ledger.track(tp, offset)
            model.track(offset)

    @rule(data=st.data(), tp=st.sampled_from(PARTITIONS), acks=st.integers(1, 5))
    def settle(self, data: st.DataObject, tp: TopicPartition, acks: int) -> None:
        for _ in range(acks):
            model = self.models.get(tp)
            if model is None:
                offset = data.draw(st.integers(0, 40), label="offset")
                assert self.ledger.settle(tp, offset) is UNKNOWN
                continue
            choices = st.integers(model.start - 3, model.next_offset + 3)
            if model.tracked:
                # Settling the head often keeps commits moving, so confirmations have work to do.
                head = st.just(model.commit_offset())
                choices = st.one_of(head, st.sampled_from(model.tracked), choices)
            offset = data.draw(choices, label="offset")
            assert self.ledger.settle(tp, offset) is model.outcome(offset)
            model.settle(offset)

    @rule(data=st.data())
    def commit(self, data: st.DataObject) -> None:
        """Request a commit, then confirm some of those in flight, in any order. (One rule, not
        two: Hypothesis switches random rules off per run, and a request is pointless alone.)"""
        pending = self.ledger.pending_commits()
        # Every partition whose commit point moved is offered; others may be offered at their
        # current commit point too (settled records above it changed: new metadata).
        moved = {
            tp: model.commit_offset()
            for tp, model in self.models.items()
            if model.commit_offset() > self.committed[tp]
        }
        assert moved.items() <= pending.items()
        assert all(offset == self.models[tp].commit_offset() for tp, offset in pending.items())
        if pending:
            self.in_flight.append((pending, {tp: self.generation[tp] for tp in pending}))
        while self.in_flight:
            if not data.draw(st.booleans(), label="confirm one"):
                break
            index = data.draw(st.integers(0, len(self.in_flight) - 1), label="which")
            self.confirm(*self.in_flight.pop(index))

    def confirm(
        self, offsets: dict[TopicPartition, int], generations: dict[TopicPartition, int]
    ) -> None:
        self.ledger.mark_committed(offsets)
        for tp, offset in offsets.items():
            model = self.models.get(tp)
            if model is None or offset <= self.committed[tp]:
                continue
            if offset <= model.commit_offset():
                self.committed[tp] = offset
            else:  # only a previous assignment can have offered a commit beyond this point
                assert generations[tp] != self.generation[tp]

    @rule(
        offsets=st.dictionaries(
            st.sampled_from([*PARTITIONS, ("c", 0)]), st.integers(0, 80), max_size=3
        )
    )
    def confirm_arbitrary(self, offsets: dict[TopicPartition, int]) -> None:
        """Whatever the broker reports, the committed offset stays safe."""
        self.ledger.mark_committed(offsets)
        for tp, offset in offsets.items():
            model = self.models.get(tp)
            if model is not None and self.committed[tp] < offset <= model.commit_offset():
                self.committed[tp] = offset

    @invariant()
    def agrees_with_the_model(self) -> None:
        assert sorted(self.ledger.partitions()) == sorted(self.models)
        assert self.ledger.unsettled == sum(model.unsettled for model in self.models.values())
        for tp in PARTITIONS:
            model = self.models.get(tp)
            part = self.ledger.partition(tp)
            committed = self.ledger.committed(tp)
            if model is None:
                assert part is None
                assert committed is None
                continue
            assert part is not None
            assert part.commit_offset() == model.commit_offset()
            assert committed == self.committed[tp]
            assert all(committed <= offset for offset in model.unsettled_offsets())
            assert committed >= self.last_committed[tp]
            self.last_committed[tp] = committed


LedgerMachine.TestCase.settings = settings(max_examples=500, stateful_step_count=50, deadline=None)
TestLedgerMachine = LedgerMachine.TestCase


# --- settled ranges above the commit point, carried in commit metadata ----------------------


def test_settled_ranges_cover_settled_records_above_the_commit_point_across_gaps() -> None:
    ledger = PartitionLedger(10)
    for offset in (10, 11, 12, 14, 15, 17, 18):  # 13 and 16 are gaps (markers, compaction)
        ledger.track(offset)
    for offset in (12, 14, 17):
        ledger.settle(offset)
    assert ledger.commit_offset() == 10
    assert ledger.settled_ranges() == [(12, 15), (17, 18)]
    assert ledger.settled_above == 3
    ledger.settle(10)
    assert ledger.settled_ranges() == [(12, 15), (17, 18)]
    ledger.settle(11)  # the head catches up: those ranges are now below the commit point
    assert ledger.commit_offset() == 15
    assert ledger.settled_ranges() == [(17, 18)]


def test_metadata_round_trips_and_rejects_what_it_did_not_write() -> None:
    ranges = [(12, 15), (17, 18), (1000, 1500)]
    metadata = encode_settled(10, ranges)
    assert metadata.startswith(METADATA_PREFIX)
    assert decode_settled(10, metadata) == ranges
    assert encode_settled(10, []) == ""
    for foreign in ("", "hello", "ks1:", "ks1:x+1", "ks1:1+0", "ks1:-3+2", "ks2:1+1", "ks1:1+2,"):
        assert decode_settled(10, foreign) == [], foreign


def test_metadata_that_does_not_fit_leaves_ranges_out_never_invents_them() -> None:
    ranges = [(10 + 3 * i, 11 + 3 * i) for i in range(5000)]
    metadata = encode_settled(0, ranges)
    assert len(metadata) <= METADATA_LIMIT
    decoded = decode_settled(0, metadata)
    assert decoded == ranges[: len(decoded)]
    assert len(decoded) > 100


@given(
    st.integers(min_value=0, max_value=10**12),
    st.lists(st.tuples(st.integers(0, 50), st.integers(1, 50)), max_size=60),
)
def test_metadata_round_trip_property(commit: int, steps: list[tuple[int, int]]) -> None:
    ranges = []
    previous = commit
    for gap, length in steps:
        start = previous + gap
        ranges.append((start, start + length))
        previous = start + length
    # Adjacent ranges (gap 0) are legal in the encoding; the ledger never produces them.
    decoded = decode_settled(commit, encode_settled(commit, ranges))
    assert decoded == ranges[: len(decoded)]
    if len(encode_settled(commit, ranges)) < METADATA_LIMIT - 30:
        assert decoded == ranges


@settings(max_examples=300)
@given(st.data())
def test_settled_ranges_never_include_an_unsettled_record(data: st.DataObject) -> None:
    offsets = sorted(data.draw(st.sets(st.integers(0, 200), min_size=1, max_size=80)))
    ledger = PartitionLedger(offsets[0])
    for offset in offsets:
        ledger.track(offset)
    settled = data.draw(st.sets(st.sampled_from(offsets)))
    for offset in settled:
        ledger.settle(offset)
    ranges = ledger.settled_ranges()
    covered = {o for o in offsets for start, end in ranges if start <= o < end}
    assert covered == {o for o in settled if o >= ledger.commit_offset()}
    assert all(start >= ledger.commit_offset() for start, _ in ranges)
    assert (
        decode_settled(ledger.commit_offset(), encode_settled(ledger.commit_offset(), ranges))
        == ranges
    )


@settings(max_examples=300, deadline=None)
@given(
    gaps=st.lists(st.integers(min_value=1, max_value=3), min_size=1, max_size=60),
    cuts=st.lists(st.integers(min_value=0, max_value=60), max_size=12),
    order=st.randoms(use_true_random=False),
)
def test_runs_agree_with_records_one_by_one(
    gaps: list[int], cuts: list[int], order: random.Random
) -> None:
    """track_run and settle_run (slices of a fetch, settled in any order) leave a ledger
    exactly where track and settle record by record do."""
    offsets = list(itertools.accumulate(gaps, initial=5))[1:]
    bounds = sorted({0, len(offsets), *(c for c in cuts if c < len(offsets))})
    runs = [offsets[a:b] for a, b in itertools.pairwise(bounds)]
    order.shuffle(runs)
    bulk, single = PartitionLedger(5), PartitionLedger(5)
    bulk.track_run(offsets)
    for offset in offsets:
        single.track(offset)
    for run in runs:
        bulk.settle_run(run)
        for offset in run:
            assert single.settle(offset) is SettleOutcome.SETTLED
        assert bulk.commit_offset() == single.commit_offset()
        assert bulk.settled_ranges() == single.settled_ranges()
        assert (bulk.unsettled, bulk.span, bulk.settled_above) == (
            single.unsettled,
            single.span,
            single.settled_above,
        )
        assert all(bulk.is_settled(o) == single.is_settled(o) for o in range(offsets[-1] + 2))
    with pytest.raises(ValueError, match="not tracked and unsettled"):
        bulk.settle_run(runs[0])
    with pytest.raises(ValueError, match="out of order"):
        bulk.track_run([offsets[-1]])


def test_commit_point_counts_the_records_of_the_same_commit_as_settled() -> None:
    """Ack outputs committed in one transaction with the offsets: the commit steps over the
    records they settle, and the metadata names the ones above a record still out."""
    ledger = PartitionLedger(10)
    ledger.track_run([10, 11, 12, 13, 14, 15])
    ledger.settle(13)
    plain = ledger.commit_point()
    assert (plain.offset, decode_settled(10, plain.metadata)) == (10, [(13, 14)])
    point = ledger.commit_point({10, 11, 15})
    assert point.offset == 12
    assert decode_settled(12, point.metadata) == [(13, 14), (15, 16)]
    assert point.settled_above == 2
    assert point.complete
    ledger.settle(10)
    ledger.settle(11)
    ledger.settle(15)
    assert ledger.commit_offset() == 12
    assert ledger.settled_above == point.settled_above
