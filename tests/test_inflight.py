"""The settlement state machine (sidecar/inflight.py), alone: unit tests for each known fault,
and a hypothesis state machine whose invariants include liveness."""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from sidecar.batcher import BatchLimits, TopicPartition
from sidecar.inflight import (
    MAX_REASON,
    Batch,
    InFlight,
    Pending,
    Policy,
    Refusal,
    Staged,
    Window,
)

T0: TopicPartition = ("t", 0)
T1: TopicPartition = ("t", 1)
U0: TopicPartition = ("u", 0)
PARTITIONS = (T0, T1, U0)


@dataclass(frozen=True)
class Fetch:
    """What the state machine reads of a fetch (the transcoder's `Transcoded`); each record's
    bytes are its offset, so what a run hands out can be checked against its offsets."""

    wire: bytes
    ends: list[int]
    offsets: list[int]
    sizes: list[int]
    keys: list[bytes | None] | None = None


#: A record's key follows from its offset, so a refetch brings the same keys.
KEYS: tuple[bytes | None, ...] = (b"a", b"b", None, b"a", b"c", b"a", None)


def key_of(offset: int) -> bytes | None:
    return KEYS[offset % len(KEYS)]


def fetched(offsets: list[int], sizes: list[int]) -> Fetch:
    pieces = [str(o).encode() for o in offsets]
    ends = list(itertools.accumulate(map(len, pieces)))
    return Fetch(b"".join(pieces), ends, offsets, sizes, [key_of(o) for o in offsets])


def recs(tp: TopicPartition, *offsets: int, size: int = 1) -> Fetch:
    return fetched(list(offsets), [size] * len(offsets))


def records(runs: Iterable[Pending]) -> list[tuple[str, int, int]]:
    """The records of runs, as refs, checking each run's bytes on the way."""
    out: list[tuple[str, int, int]] = []
    for run in runs:
        assert run.lo < run.hi, "an empty run"
        assert run.offset == run.offsets[0]
        assert run.size == sum(run.fetch.sizes[run.lo : run.hi])
        ends = run.fetch.ends
        start = ends[run.lo - 1] if run.lo else 0
        assert run.fetch.wire[start : ends[run.hi - 1]] == b"".join(
            str(o).encode() for o in run.offsets
        )
        out.extend((run.tp[0], run.tp[1], o) for o in run.offsets)
    return out


def policy(**overrides: object) -> Policy:
    values: dict[str, object] = {
        "batch": BatchLimits(max_records=10, max_bytes=1_000_000, max_wait_s=0),
        "ordered": False,
        "ack_deadline_s": 30.0,
        "max_attempts": 3,
        "initial_backoff_s": 1.0,
        "multiplier": 2.0,
        "max_backoff_s": 8.0,
        "dead_letters": True,
        "max_unsettled_span": 1000,
    }
    values.update(overrides)
    return Policy(**values)  # type: ignore[arg-type]


def window(name: str = "s", batches: int = 10, records: int = 100, size: int = 10**6) -> Window:
    return Window(name, max_batches=batches, max_records=records, max_bytes=size)


def started(tp: TopicPartition = T0, *offsets: int, **overrides: object) -> InFlight:
    flight = InFlight(policy(**overrides), rng=random.Random(0))
    flight.assign([tp])
    flight.add(tp, recs(tp, *offsets), 0.0)
    return flight


def refs(batch: Batch) -> list[tuple[str, int, int]]:
    return records(batch.records)


# -- the known faults, one test each ------------------------------------------------------------


def test_nack_naming_a_record_twice_takes_it_once() -> None:
    flight = started(T0, 0, 1)
    w = window()
    flight.attach(w)
    (batch,) = flight.poll(0).batches
    ref = refs(batch)[0]
    refused = flight.nack(w, [], [ref, ref], dead_letter=False, reason="", retry_after_s=0, now=0)
    assert len(refused) == 0
    assert flight.backlog.buffered(T0) == (1, 1)  # once, not twice
    assert w.out_records == 1


def test_nack_of_a_record_with_its_own_batch_takes_it_once() -> None:
    flight = started(T0, 0, 1)
    w = window()
    flight.attach(w)
    (batch,) = flight.poll(0).batches
    ids, record = [batch.id], refs(batch)[0]
    refused = flight.nack(w, ids, [record], dead_letter=False, reason="", retry_after_s=0, now=0)
    assert len(refused) == 0
    assert flight.backlog.buffered(T0) == (2, 2)
    assert w.out_records == 0
    assert not w.batches


def test_ack_of_a_record_with_its_own_batch_settles_it_once() -> None:
    flight = started(T0, 0, 1)
    w = window()
    flight.attach(w)
    (batch,) = flight.poll(0).batches
    refused = flight.ack(w, [batch.id, batch.id], [refs(batch)[1]])
    assert len(refused) == 0
    assert flight.ledger.partition(T0).commit_offset() == 2  # type: ignore[union-attr]


def test_valid_parts_of_a_request_apply_and_bad_parts_are_refused() -> None:
    flight = started(T0, 0, 1)
    w = window()
    flight.attach(w)
    (batch,) = flight.poll(0).batches
    refused = flight.ack(w, [99], [refs(batch)[0], ("t", 0, 7), ("nope", 3, 0)])
    assert refused.batches == {Refusal.UNKNOWN: [99]}
    assert refused.records == {Refusal.UNKNOWN: [("t", 0, 7), ("nope", 3, 0)]}
    assert flight.ledger.partition(T0).commit_offset() == 1  # type: ignore[union-attr]


def test_retry_after_is_capped_by_the_max_backoff() -> None:
    flight = started(T0, 0, max_backoff_s=8.0)
    w = window()
    flight.attach(w)
    (batch,) = flight.poll(0).batches
    flight.nack(w, [batch.id], [], dead_letter=False, reason="", retry_after_s=2**32 / 1000, now=0)
    dispatch = flight.poll(8.0)
    assert [refs(b) for b in dispatch.batches] == [[("t", 0, 0)]]


@pytest.mark.parametrize("move", ["reassignment", "live reset"])
def test_a_dead_letter_confirmed_for_an_older_assignment_is_ignored(move: str) -> None:
    flight = started(T0, 0)
    w = window()
    flight.attach(w)
    (batch,) = flight.poll(0).batches
    flight.nack(w, [batch.id], [], dead_letter=True, reason="bad", retry_after_s=0, now=0)
    ((letter, _),) = flight.take_letters()
    if move == "reassignment":
        flight.revoke([T0])
        flight.assign([T0])
    else:
        flight.reset([T0])
    flight.add(T0, recs(T0, 0), 1.0)
    assert not flight.dead_lettered(letter)
    assert flight.ledger.partition(T0).unsettled == 1  # type: ignore[union-attr]
    assert flight.stats.stale_confirmations == 1


def test_a_huge_reason_is_cut_so_the_dead_letter_stays_writable() -> None:
    flight = started(T0, 0)
    flight.attach(w := window())
    (batch,) = flight.poll(0).batches
    flight.nack(w, [batch.id], [], dead_letter=True, reason="r" * 2**20, retry_after_s=0, now=0)
    ((_, reason),) = flight.take_letters()
    assert len(reason) == MAX_REASON
    assert reason.endswith("…")


def test_revoking_partitions_get_no_redeliveries_under_ordering_none() -> None:
    flight = started(T0, 0, 1, ordered=False)
    w = window()
    flight.attach(w)
    (batch,) = flight.poll(0).batches
    flight.nack(w, [], [refs(batch)[0]], dead_letter=False, reason="", retry_after_s=0.001, now=0)
    flight.begin_revoke([T0])
    assert flight.poll(10).batches == []
    assert flight.unsettled_in([T0]) == 1  # the record still out may be acked in the grace


def test_the_bytes_window_is_never_overshot_by_a_busy_stream() -> None:
    flight = InFlight(policy(), rng=random.Random(0))
    flight.assign([T0])
    flight.add(T0, recs(T0, 0, 1, size=60), 0.0)
    w = window(size=100)
    flight.attach(w)
    batches = flight.poll(0).batches
    assert [refs(b) for b in batches] == [[("t", 0, 0)]]
    assert w.out_bytes == 60


def test_a_record_larger_than_the_window_goes_alone_to_an_idle_stream() -> None:
    flight = InFlight(policy(), rng=random.Random(0))
    flight.assign([T0])
    flight.add(T0, recs(T0, 0, size=500), 0.0)
    w = window(size=100)
    flight.attach(w)
    assert [refs(b) for b in flight.poll(0).batches] == [[("t", 0, 0)]]


def test_a_stuck_record_pauses_its_partition_at_the_span_cap() -> None:
    flight = started(T0, *range(10), max_unsettled_span=10)
    assert flight.backpressure(T0, paused=False)
    flight.attach(w := window())
    (batch,) = flight.poll(0).batches
    flight.ack(w, [], refs(batch)[1:])  # everything but the first
    assert flight.backpressure(T0, paused=True)  # still held behind offset 0
    flight.ack(w, [batch.id], [])
    assert not flight.backpressure(T0, paused=True)


def test_a_position_moving_backwards_starts_the_partition_over() -> None:
    flight = started(T0, 5, 6, 7)
    flight.attach(w := window())
    (batch,) = flight.poll(0).batches
    assert flight.add(T0, recs(T0, 2, 3), 1.0)  # repositioned, not an exception
    assert flight.ack(w, [batch.id], []).batches == {Refusal.REVOKED: [batch.id]}
    assert flight.ledger.partition(T0).commit_offset() == 2  # type: ignore[union-attr]


def test_acks_for_revoked_partitions_are_refused_as_revoked() -> None:
    flight = started(T0, 0)
    flight.attach(w := window())
    (batch,) = flight.poll(0).batches
    held = refs(batch)
    flight.revoke([T0])
    assert flight.ack(w, [], held).records == {Refusal.REVOKED: [("t", 0, 0)]}


# -- the state machine --------------------------------------------------------------------------


@dataclass(eq=False)
class AppStream:
    window: Window
    #: Batches received, by id: what the app may ack or nack (stale ones included).
    received: dict[int, list[tuple[str, int, int]]] = field(default_factory=dict)


class InFlightMachine(RuleBasedStateMachine):
    """Random fetches, streams, acks, nacks (real, neighbouring and made-up refs, duplicates,
    record plus batch), deadlines, retries, dead letters confirmed late or never, revokes,
    resets and repositions. Invariants: every unsettled record is in exactly one place,
    windows hold, ordering holds, and (at teardown) liveness: a well-behaved app drains
    everything and every partition's commit reaches its end."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.streams: list[AppStream] = []
        self.letters: list[Pending] = []
        #: Acks with outputs whose writing has not been reported back yet.
        self.staged: list[Staged] = []
        self.next_offset: dict[TopicPartition, int] = dict.fromkeys(PARTITIONS, 0)
        self.paused: set[TopicPartition] = set()
        self.names = 0

    @initialize(
        ordering=st.sampled_from(["none", "partition", "key"]),
        dead_letters=st.booleans(),
        max_records=st.integers(1, 5),
        max_bytes=st.integers(1, 40),
        linger=st.sampled_from([0.0, 0.5]),
        max_attempts=st.integers(1, 3),
        span=st.integers(3, 30),
        fetch_bytes=st.integers(1, 40),
        transactional=st.booleans(),
    )
    def setup(
        self,
        ordering: str,
        dead_letters: bool,
        max_records: int,
        max_bytes: int,
        linger: float,
        max_attempts: int,
        span: int,
        fetch_bytes: int,
        transactional: bool,
    ) -> None:
        self.flight = InFlight(
            policy(
                batch=BatchLimits(max_records, max_bytes, linger),
                ordered=ordering == "partition",
                keyed=ordering == "key",
                ack_deadline_s=5.0,
                max_attempts=max_attempts,
                initial_backoff_s=0.5,
                max_backoff_s=4.0,
                dead_letters=dead_letters,
                max_unsettled_span=span,
                fetch_bytes=fetch_bytes,
                transactional=transactional,
            ),
            rng=random.Random(0),
        )
        self.flight.assign(PARTITIONS)

    # -- Kafka side ---------------------------------------------------------------------------

    @rule(tp=st.sampled_from(PARTITIONS), count=st.integers(1, 10), gaps=st.integers(0, 2))
    def fetch(self, tp: TopicPartition, count: int, gaps: int) -> None:
        if tp in self.paused:
            return
        offsets = []
        offset = self.next_offset[tp]
        for i in range(count):
            offsets.append(offset)
            offset += 1 + (gaps if i % 2 else 0)
        self.next_offset[tp] = offset
        self.flight.add(tp, fetched(offsets, [o % 7 for o in offsets]), self.now)
        self._poll()

    @rule(tp=st.sampled_from(PARTITIONS), back=st.integers(1, 5))
    def reposition(self, tp: TopicPartition, back: int) -> None:
        """The consumer fetches from below what it already fetched (auto_offset_reset)."""
        self.next_offset[tp] = max(0, self.next_offset[tp] - back)

    @rule(tp=st.sampled_from(PARTITIONS))
    def revoke_and_reassign(self, tp: TopicPartition) -> None:
        self.flight.begin_revoke([tp])
        self.flight.revoke([tp])
        self.flight.assign([tp])
        self._poll()

    @rule(tp=st.sampled_from(PARTITIONS))
    def begin_revoke(self, tp: TopicPartition) -> None:
        self.flight.begin_revoke([tp])

    @rule(tp=st.sampled_from(PARTITIONS))
    def reset(self, tp: TopicPartition) -> None:
        self.flight.reset([tp])
        self._poll()

    @rule(tp=st.sampled_from(PARTITIONS), start=st.integers(0, 3), length=st.integers(1, 4))
    def skip_settled_by_previous_owner(self, tp: TopicPartition, start: int, length: int) -> None:
        if self.flight.ledger.partition(tp) is None:
            base = self.next_offset[tp] + start
            self.flight.skip(tp, [(base, base + length)])

    def _backpressure(self) -> None:
        for tp in PARTITIONS:
            if self.flight.backpressure(tp, tp in self.paused):
                self.paused.add(tp)
            else:
                self.paused.discard(tp)

    # -- app side -----------------------------------------------------------------------------

    @rule(
        batches=st.integers(1, 3),
        records=st.integers(1, 8),
        size=st.integers(1, 60),
    )
    def attach(self, batches: int, records: int, size: int) -> None:
        self.names += 1
        w = window(f"s{self.names}", batches, records, size)
        self.flight.attach(w)
        self.streams.append(AppStream(w))
        self._poll()

    @precondition(lambda self: self.streams)
    @rule(data=st.data())
    def detach(self, data: st.DataObject) -> None:
        stream = data.draw(st.sampled_from(self.streams))
        self.flight.detach(stream.window, self.now)
        self.streams.remove(stream)
        self._poll()

    @precondition(lambda self: self.streams)
    @rule(data=st.data())
    def drain(self, data: st.DataObject) -> None:
        data.draw(st.sampled_from(self.streams)).window.draining = True

    @rule(dt=st.sampled_from([0.3, 1.0, 6.0]))
    def tick(self, dt: float) -> None:
        self.now += dt
        self._poll()

    def _poll(self) -> None:
        """The dispatcher looks at the backlog after every input, as the real one does."""
        flight = self.flight
        dispatch = flight.poll(self.now)
        by_window = {s.window.id: s for s in self.streams}
        for batch in dispatch.batches:
            by_window[batch.window.id].received[batch.id] = records(batch.records)
            if flight.policy.ordered:
                self._check_ordered(batch)
            if flight.policy.keyed:
                self._check_keyed(batch)
            if flight.policy.transactional:
                assert len({p.tp for p in batch.records}) == 1, "a batch of two partitions"
        self.letters.extend(p for p, _ in flight.take_letters())
        self.staged.extend(flight.take_staged())
        self._backpressure()

    def _check_ordered(self, batch: Batch) -> None:
        """Under partition ordering a partition's records go out lowest first, one batch of
        them at a time, and nothing of it waits in the backlog below what went out."""
        for tp in {p.tp for p in batch.records}:
            sent = [o for t, p, o in records(batch.records) if (t, p) == tp]
            assert sent == sorted(sent)
            part = self.flight._parts[tp]
            assert all(p.batch is batch for p in part.out.values()), "two batches of one partition"
            lowest = self.flight.backlog.lowest_offset(tp)
            assert lowest is None or lowest > sent[-1]

    def _check_keyed(self, batch: Batch) -> None:
        """Under key ordering a record goes out only when no earlier record of its key (and
        partition) is unsettled: not out, not waiting for a retry, not on its way to the
        DLQ, not even waiting to go out first."""
        for run in batch.records:
            assert len(run) == 1, "a run of several records under key ordering"
            ledger = self.flight.ledger.partition(run.tp)
            assert ledger is not None
            unsettled = {o for o, settled in ledger._window.items() if not settled}
            earlier = [o for o in unsettled if o < run.offset and key_of(o) == run.key]
            assert not earlier, f"{run.tp}@{run.offset} went out before {earlier} of its key"

    @invariant()
    def one_record_of_a_key_out_at_a_time(self) -> None:
        if not hasattr(self, "flight") or not self.flight.policy.keyed:
            return
        for tp, part in self.flight._parts.items():
            keys = [p.key for p in part.out.values()]
            assert len(keys) == len(set(keys)), f"{tp}: two records of one key out: {keys}"

    def _refs(
        self, data: st.DataObject, stream: AppStream
    ) -> tuple[list[int], list[tuple[str, int, int]]]:
        real = [r for records in stream.received.values() for r in records]
        ref_choices = [st.tuples(st.sampled_from([*PARTITIONS, ("x", 9)]), st.integers(0, 40))]
        if real:
            ref_choices.append(st.sampled_from(real).map(lambda r: ((r[0], r[1]), r[2])))
            ref_choices.append(
                st.sampled_from(real).map(lambda r: ((r[0], r[1]), r[2] + 1))  # neighbours
            )
        picked = data.draw(st.lists(st.one_of(ref_choices), max_size=5))
        record_refs = [(tp[0], tp[1], offset) for tp, offset in picked]
        id_choices = [st.integers(0, 50)]
        if stream.received:
            id_choices.append(st.sampled_from(sorted(stream.received)))
        batch_ids = data.draw(st.lists(st.one_of(id_choices), max_size=3))
        return batch_ids, record_refs

    @precondition(lambda self: self.streams)
    @rule(data=st.data())
    def ack(self, data: st.DataObject) -> None:
        stream = data.draw(st.sampled_from(self.streams))
        batch_ids, record_refs = self._refs(data, stream)
        self.flight.ack(stream.window, batch_ids, record_refs)
        self._poll()

    @precondition(lambda self: self.streams)
    @rule(data=st.data())
    def ack_with_outputs(self, data: st.DataObject) -> None:
        stream = data.draw(st.sampled_from(self.streams))
        batch_ids, record_refs = self._refs(data, stream)
        self.flight.ack(stream.window, batch_ids, record_refs, outputs="outputs")
        self._poll()

    @precondition(lambda self: self.staged)
    @rule(data=st.data(), outcome=st.sampled_from(["written", "failed", "released"]))
    def outputs_reported(self, data: st.DataObject, outcome: str) -> None:
        """The shell reports on an ack's outputs (late ones too: after a revoke or reset)."""
        staged = data.draw(st.sampled_from(self.staged))
        self.staged.remove(staged)
        if outcome == "written":
            self.flight.written(staged)
        elif outcome == "failed":
            self.flight.failed(staged, "outputs refused", self.now)
        else:
            self.flight.released(staged, self.now)
        self._poll()

    @precondition(lambda self: self.streams)
    @rule(
        data=st.data(),
        dead_letter=st.booleans(),
        retry_after=st.sampled_from([0.0, 0.001, 2.0, 2**32 / 1000]),
    )
    def nack(self, data: st.DataObject, dead_letter: bool, retry_after: float) -> None:
        stream = data.draw(st.sampled_from(self.streams))
        batch_ids, record_refs = self._refs(data, stream)
        self.flight.nack(
            stream.window,
            batch_ids,
            record_refs,
            dead_letter=dead_letter,
            reason="r" * 10,
            retry_after_s=retry_after,
            now=self.now,
        )
        self._poll()

    @precondition(lambda self: self.letters)
    @rule(data=st.data())
    def confirm_dead_letter(self, data: st.DataObject) -> None:
        letter = data.draw(st.sampled_from(self.letters))
        self.letters.remove(letter)
        self.flight.dead_lettered(letter)
        self._poll()

    # -- invariants ---------------------------------------------------------------------------

    @invariant()
    def every_unsettled_record_is_in_exactly_one_place(self) -> None:
        flight = self.flight
        if not hasattr(self, "flight"):
            return
        waiting: dict[TopicPartition, list[int]] = {}
        for queue_tp, queue in flight.backlog._queues.items():
            waiting.setdefault(queue_tp, []).extend(o for p in queue.records for o in p.offsets)
            assert queue.count == sum(len(p) for p in queue.records)
            assert queue.bytes == sum(p.size for p in queue.records)
        for _, _, pending in flight.backlog._delayed:
            waiting.setdefault(pending.tp, []).extend(pending.offsets)
        letters = {(p.tp, p.offset) for p in self.letters}
        staged = {id(s) for s in self.staged}
        for tp, part in flight._parts.items():
            ledger = flight.ledger.partition(tp)
            unsettled = (
                {o for o, settled in ledger._window.items() if not settled} if ledger else set()
            )
            here = waiting.get(tp, [])
            out = [o for _, _, o in records(part.out.values())]
            assert len(here) == len(set(here)), f"{tp}: a record waits twice"
            assert len(out) == len(set(out)), f"{tp}: a record is out twice"
            assert not set(here) & set(out), f"{tp}: waiting and out at once"
            assert set(here) | set(out) == unsettled, f"{tp}: a record dropped out of view"
            for offset, pending in part.out.items():
                assert pending.offset == offset
                assert pending.epoch == part.epoch
                if pending.staged is not None:
                    assert pending.batch is None
                    assert id(pending.staged) in staged, f"{tp}@{offset}: staged, never reported"
                    assert pending in pending.staged.runs
                    if flight.policy.transactional:
                        assert {p.tp for p in pending.staged.runs} == {tp}
                elif pending.batch is None:
                    assert len(pending) == 1, "a dead letter of more than one record"
                    assert (tp, offset) in letters, f"{tp}@{offset}: neither out nor a letter"
                else:
                    assert pending in pending.batch.records
                    assert pending.batch.window.batches.get(pending.batch.id) is pending.batch

    @invariant()
    def windows_hold(self) -> None:
        if not hasattr(self, "flight"):
            return
        for stream in self.streams:
            w = stream.window
            runs = [p for b in w.batches.values() for p in b.records]
            assert all(b.records for b in w.batches.values()), "an empty batch is still held"
            assert w.out_records == len(records(runs))
            assert w.out_bytes == sum(p.size for p in runs)
            assert len(w.batches) <= w.max_batches
            assert w.out_records <= w.max_records
            assert w.out_bytes <= w.max_bytes or w.out_records == 1

    # -- liveness -----------------------------------------------------------------------------

    def teardown(self) -> None:
        """From now on the app behaves: its old streams end or drain (and never ack what they
        hold), one new stream acks everything it gets, dead letters are confirmed, revokes
        complete. Then every record is settled and every partition's commit reaches its end."""
        if not hasattr(self, "flight"):
            return
        flight = self.flight
        revoking = [tp for tp, part in flight._parts.items() if part.revoking]
        flight.revoke(revoking)
        for i, stream in enumerate(self.streams):
            if i % 2:
                stream.window.draining = True
            else:
                flight.detach(stream.window, self.now)
        good = window("good", 10**6, 10**6, 10**9)
        flight.attach(good)
        for _ in range(200):
            self.now += 10.0
            dispatch = flight.poll(self.now)
            flight.ack(good, [b.id for b in dispatch.batches], [])
            letters = [p for p, _ in flight.take_letters()] + self.letters
            self.letters = []
            for letter in letters:
                flight.dead_lettered(letter)
            for staged in [*flight.take_staged(), *self.staged]:
                flight.written(staged)
            self.staged = []
            if not flight.unsettled and not len(flight.backlog):
                break
        assert flight.unsettled == 0, "records stuck with a stream or the DLQ"
        assert len(flight.backlog) == 0, "records stuck in the backlog"
        for tp in flight.assigned:
            ledger = flight.ledger.partition(tp)
            if ledger is not None:
                assert ledger.unsettled == 0
                assert ledger.commit_offset() == ledger.next_offset, f"{tp}: commit stuck"


TestInFlightMachine = InFlightMachine.TestCase
TestInFlightMachine.settings = settings(
    max_examples=1000,
    stateful_step_count=80,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.mark.parametrize("ordered", [True, False])
def test_liveness_after_a_poison_record_with_no_dead_letter_topic(ordered: bool) -> None:
    """Without a DLQ a record nacked forever keeps coming back; once the app acks it, the
    partition drains."""
    flight = started(T0, 0, 1, 2, ordered=ordered, dead_letters=False)
    flight.attach(w := window())
    now = 0.0
    for _ in range(10):
        for batch in flight.poll(now).batches:
            flight.nack(w, [batch.id], [], dead_letter=False, reason="", retry_after_s=0, now=now)
        now += 10
    assert not flight.take_letters()
    for _ in range(3):
        flight.ack(w, [b.id for b in flight.poll(now).batches], [])
        now += 10
    assert flight.ledger.partition(T0).commit_offset() == 3  # type: ignore[union-attr]


# -- acks with outputs ---------------------------------------------------------------------------


def commit_of(flight: InFlight, tp: TopicPartition = T0) -> int:
    ledger = flight.ledger.partition(tp)
    assert ledger is not None
    return ledger.commit_offset()


def test_an_ack_with_outputs_settles_its_records_only_once_they_are_written() -> None:
    flight = started(T0, 0, 1, 2, ordered=True)
    flight.attach(w := window())
    (batch,) = flight.poll(0.0).batches
    assert not flight.ack(w, [batch.id], [], outputs=["o"])
    (staged,) = flight.take_staged()
    assert staged.outputs == ["o"]
    assert staged.offsets() == [0, 1, 2]
    assert w.out_records == 0, "staged records leave the stream's window"
    assert flight.unsettled == 3
    assert commit_of(flight) == 0
    assert flight.whereabouts(T0, 1) == "acked with outputs, waiting for them to be written"
    flight.add(T0, recs(T0, 3), 0.0)
    assert not flight.poll(0.0).batches, "partition ordering: the staged records come first"
    assert flight.written(staged) == 3
    assert commit_of(flight) == 3
    assert [records(b.records) for b in flight.poll(0.0).batches] == [[("t", 0, 3)]]
    assert flight.written(staged) == 0, "a second report changes nothing"


def test_released_outputs_never_dead_letter_and_failed_ones_do_once_attempts_run_out() -> None:
    flight = started(T0, 0, max_attempts=2)
    flight.attach(w := window())

    def deliver_and_stage(now: float) -> Staged:
        (batch,) = flight.poll(now).batches
        flight.ack(w, [batch.id], [], outputs=["o"])
        (staged,) = flight.take_staged()
        return staged

    for now in (0.0, 1.0, 2.0):  # a transaction aborted for another ack's outputs
        flight.released(deliver_and_stage(now), now)
        assert not flight.take_letters()
    staged = deliver_and_stage(3.0)
    assert staged.runs[0].attempts == 4
    flight.failed(staged, "outputs refused", 3.0)
    ((letter, reason),) = flight.take_letters()
    assert letter.offset == 0
    assert reason.startswith("outputs refused")
    assert flight.dead_lettered(letter)
    assert commit_of(flight) == 1


def test_outputs_after_a_revoke_settle_nothing() -> None:
    flight = started(T0, 0, 1)
    flight.attach(w := window())
    (batch,) = flight.poll(0.0).batches
    flight.ack(w, [batch.id], [], outputs=["o"])
    (staged,) = flight.take_staged()
    flight.begin_revoke([T0])
    assert flight.unsettled_in([T0]) == 2, "the revoke grace waits for staged records"
    flight.revoke([T0])
    flight.assign([T0])
    flight.add(T0, recs(T0, 0, 1), 0.0)
    assert flight.written(staged) == 0
    flight.failed(staged, "late", 0.0)
    flight.released(staged, 0.0)
    assert commit_of(flight) == 0
    assert len(flight.backlog) == 2, "the new assignment's records are untouched"


def test_transactions_keep_batches_and_acks_with_outputs_to_one_partition() -> None:
    flight = InFlight(policy(transactional=True), rng=random.Random(0))
    flight.assign([T0, T1])
    flight.add(T0, recs(T0, 0, 1), 0.0)
    flight.add(T1, recs(T1, 0, 1), 0.0)
    flight.attach(w := window())
    batches = flight.poll(0.0).batches
    assert {p.tp for b in batches for p in b.records} == {T0, T1}
    assert all(len({p.tp for p in b.records}) == 1 for b in batches)
    refused = flight.ack(w, [b.id for b in batches], [], outputs=["o"])
    assert refused.batches == {Refusal.INVALID: [b.id for b in batches]}
    assert refused.message is not None
    assert "one partition" in refused.message
    assert not flight.take_staged()
    assert flight.unsettled == 4
    tp = next(iter(batches[0].records)).tp
    assert not flight.ack(w, [batches[0].id], [], outputs=["o"])
    assert flight.take_staged()[0].tp == tp
