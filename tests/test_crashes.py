"""Crashes, shutdowns and session ends on the real broker, real processes killed (DESIGN.md §4).

Each test proves its guarantee with Kafka's own view of the group (committed offsets against
end offsets, the coordinator's member list), not the sidecar's word, and prints its figures
(records produced / acked / duplicated) on a `[figures]` line for the issue's report.

Not here: the slow app that settles nothing for 2x `max_poll_interval_ms` without a rebalance
is tests/test_delivery.py::test_flow_control_window_holds_and_a_stalled_app_keeps_the_group.
Dead letters, retries and ack deadlines are tests/test_failures.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from kafkasidecar.v1 import consumer_pb2 as pb
from sidecar.ledger import decode_settled
from tests.localkafka import LocalKafka, committed_offsets, describe_group, end_offsets
from tests.sidecarproc import AppStream, SidecarProcess, aws_env, group_subscription
from tests.test_delivery import produce

TopicFactory = Callable[..., Awaitable[str]]
StartSidecar = Callable[..., Awaitable[SidecarProcess]]
#: A record of the test's one topic: (partition, offset).
Key = tuple[int, int]

# Fast failure detection, so a killed member's partitions move on within seconds.
FAST_GROUP = {"session_timeout_ms": 6000, "heartbeat_interval_ms": 1000}


def figures(scenario: str, **values: object) -> str:
    line = f"[figures] {scenario}: " + ", ".join(f"{k}={v}" for k, v in values.items())
    print(line)
    return line


def keys_of(batch: pb.Batch) -> list[Key]:
    return [(r.partition, r.offset) for r in batch.records]


def lowest_unacked(produced: set[Key], acked: set[Key]) -> dict[int, int]:
    """Per partition, the offset a correct sidecar commits once these acks are in: the lowest
    record not acked, or the end. Produced offsets are contiguous from 0 (a fresh topic)."""
    commit: dict[int, int] = {}
    for partition in {p for p, _ in produced}:
        offsets = sorted(o for p, o in produced if p == partition)
        commit[partition] = next(
            (o for o in offsets if (partition, o) not in acked), offsets[-1] + 1
        )
    return commit


async def ack_the_rest(
    kafka: LocalKafka,
    sidecar: SidecarProcess,
    sub: dict[str, Any],
    topic: str,
    produced: set[Key],
    acked: set[Key],
) -> set[Key]:
    """A fresh app acks whatever it gets until every produced record was acked by it or
    before, and the group's commits reach the end; returns what it got (the replays)."""
    again: set[Key] = set()
    async with grpc.aio.insecure_channel(sidecar.address) as channel:
        app = AppStream(channel, keep=False)
        await app.open(sub["name"])
        while (acked | again) != produced:
            batch = (await app.next("batch")).batch
            again.update(keys_of(batch))
            app.ack(batch_ids=[batch.batch_id])
        await wait_all_committed(kafka, sub["group_id"], topic)
        app.close()
    return again


async def committed(kafka: LocalKafka, group_id: str) -> dict[int, int]:
    """Kafka's committed offsets of the group, by partition (the tests use one topic)."""
    return {p: o for (_t, p), o in (await committed_offsets(kafka, group_id)).items() if o >= 0}


async def wait_committed(
    kafka: LocalKafka, group_id: str, expected: dict[int, int], timeout: float = 60
) -> None:
    """Until the group's committed offsets are exactly `expected` (partitions at 0 may have
    no commit at all)."""
    want = {p: o for p, o in expected.items() if o > 0}
    seen: dict[int, int] = {}
    try:
        async with asyncio.timeout(timeout):
            while (seen := await committed(kafka, group_id)) != want:
                await asyncio.sleep(0.2)
    except TimeoutError:
        raise AssertionError(f"committed {seen}, expected {want}") from None


async def settled_in_metadata(kafka: LocalKafka, group_id: str) -> set[Key]:
    """The records the group's commit metadata marks as settled above the committed offsets."""
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.plaintext)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group_id)
    finally:
        await admin.close()
    return {
        (tp.partition, offset)
        for tp, meta in offsets.items()
        for start, end in decode_settled(meta.offset, meta.metadata or "")
        for offset in range(start, end)
    }


async def wait_all_committed(
    kafka: LocalKafka, group_id: str, topic: str, timeout: float = 90
) -> None:
    ends = await end_offsets(kafka, topic)
    await wait_committed(kafka, group_id, {p: o for (_t, p), o in ends.items()}, timeout)


async def wait_until(
    condition: Callable[[], bool], timeout: float, message: Callable[[], str]
) -> None:
    try:
        async with asyncio.timeout(timeout):
            while not condition():
                await asyncio.sleep(0.1)
    except TimeoutError:
        raise AssertionError(message()) from None


async def wait_group(
    kafka: LocalKafka, group_id: str, members: int, state: str, timeout: float = 60
) -> list[str]:
    """Until the coordinator shows the group in `state` with `members` members; their ids."""
    seen: tuple[str, list[str]] = ("", [])
    try:
        async with asyncio.timeout(timeout):
            while True:
                seen = await describe_group(kafka, group_id)
                if seen[0] == state and len(seen[1]) == members:
                    return seen[1]
                await asyncio.sleep(0.3)
    except TimeoutError:
        raise AssertionError(f"group is {seen}, expected {state} with {members}") from None


class Tally:
    """What the in-process apps received and acked, over all their streams."""

    def __init__(self) -> None:
        self.deliveries: Counter[Key] = Counter()
        #: Acks sent and not rejected, per record (a record may be acked on several streams).
        self.acks: Counter[Key] = Counter()
        self.kinds: Counter[str] = Counter()
        #: Which stream first got each record, and redeliveries by that stream: a duplicate
        #: is charged to the stream (and its fate) that had the record first.
        self.first: dict[Key, str] = {}
        self.duplicates_by: Counter[str] = Counter()

    def delivered(self, keys: list[Key], stream: str) -> None:
        self.deliveries.update(keys)
        for key in keys:
            if key in self.first:
                self.duplicates_by[self.first[key]] += 1
            else:
                self.first[key] = stream

    @property
    def acked(self) -> set[Key]:
        return {key for key, count in self.acks.items() if count > 0}

    @property
    def duplicates(self) -> int:
        """Deliveries beyond the first of each record."""
        return sum(self.deliveries.values()) - len(self.deliveries)


async def ack_everything(
    app: AppStream, tally: Tally, processing_s: float = 0, name: str = "app"
) -> int:
    """An app that acks each batch `processing_s` after it arrives (batches are processed
    concurrently, so its window stays busy), until its stream ends: cleanly, or because the
    sidecar went away. Acks the sidecar refuses are not counted as acked, nor acks due after
    the stream ended. Returns how many records this stream received."""
    sent: dict[int, list[Key]] = {}
    received = 0
    ended = False
    loop = asyncio.get_running_loop()

    def settle(batch_id: int, keys: list[Key]) -> None:
        if not ended:
            app.ack(batch_ids=[batch_id])
            tally.acks.update(keys)
            sent[batch_id] = keys

    while True:
        try:
            response = await app.next(timeout=3600)
        except (grpc.aio.AioRpcError, AssertionError):  # AppStream asserts on a clean end
            ended = True
            return received
        kind = response.WhichOneof("kind") or ""
        tally.kinds[kind] += 1
        if kind == "batch":
            keys = keys_of(response.batch)
            tally.delivered(keys, name)
            received += len(keys)
            if processing_s:
                loop.call_later(processing_s, settle, response.batch.batch_id, keys)
            else:
                settle(response.batch.batch_id, keys)
        elif kind == "rejected":
            for batch_id in response.rejected.batch_ids:
                tally.acks.subtract(sent.pop(batch_id, []))


async def test_sidecar_kill_9_with_batches_in_flight_redelivers_only_the_unsettled(
    kafka: LocalKafka,
    new_topic: TopicFactory,
    producer: AIOKafkaProducer,
    start_sidecar: StartSidecar,
) -> None:
    topic = await new_topic(partitions=3)
    produced = set(await produce(producer, topic, 3000, partitions=3))
    sub = group_subscription(
        "crash",
        topic,
        ordering="none",
        batch={"max_records": 50, "max_wait_ms": 50},
        window={"max_outstanding_batches": 6, "max_outstanding_records": 300},
        consumer=FAST_GROUP,
    )
    group_id = sub["group_id"]
    first = await start_sidecar([sub], listener="plaintext")
    received: set[Key] = set()
    acked: set[Key] = set()
    rng = random.Random(4)
    async with grpc.aio.insecure_channel(first.address) as channel:
        app = AppStream(channel, keep=False)
        await app.open("crash")
        held: list[pb.Batch] = []
        # Ack in random order: some acked records sit above held ones for a while.
        while len(acked) < len(produced) // 2:
            batch = (await app.next("batch")).batch
            received.update(keys_of(batch))
            held.append(batch)
            if len(held) >= 5:
                for done in rng.sample(held, 3):
                    held.remove(done)
                    app.ack(batch_ids=[done.batch_id])
                    acked.update(keys_of(done))

        async def fill_window() -> None:
            with contextlib.suppress(TimeoutError):
                while True:
                    batch = (await app.next("batch", timeout=2)).batch
                    received.update(keys_of(batch))
                    held.append(batch)

        # The state at the kill: the window full, its oldest batch of each partition unacked
        # (holding the commit back), newer ones acked (above the commit: the other kind of
        # record a crash may deliver again), and a fresh window's worth unacked on top.
        await fill_window()
        keep = {
            min((o, b.batch_id) for b in held for p, o in keys_of(b) if p == partition)[1]
            for partition in {p for b in held for p, _ in keys_of(b)}
        }
        for batch in [b for b in held if b.batch_id not in keep]:
            held.remove(batch)
            app.ack(batch_ids=[batch.batch_id])
            acked.update(keys_of(batch))
        await fill_window()
        unacked = received - acked
        assert unacked, "nothing in flight at the kill"
        # The acks are in once Kafka shows the commit point at the lowest unacked record.
        at_kill = lowest_unacked(produced, acked)
        await wait_committed(kafka, group_id, at_kill)
        # ...and once its metadata carries every ack above that point.
        acked_above = {(p, o) for p, o in acked if o >= at_kill[p]}
        async with asyncio.timeout(60):
            while not acked_above <= await settled_in_metadata(kafka, group_id):
                await asyncio.sleep(0.2)
        assert first.proc is not None
        first.proc.kill()
        assert await asyncio.to_thread(first.wait, 30) == -signal.SIGKILL

    # Delivered at or above the commit: without the commit metadata all of these would come
    # again; with it, only the unacked ones do.
    may_repeat = {(p, o) for p, o in received if o >= at_kill[p]}
    acked_uncommitted = may_repeat - unacked
    assert unacked <= may_repeat, "a commit passed a record the app never acked"
    assert acked_uncommitted, "the scenario should leave acked records above the commit"

    second = await start_sidecar([sub], listener="plaintext")
    again: dict[Key, int] = {}
    async with grpc.aio.insecure_channel(second.address) as channel:
        app = AppStream(channel, keep=False)
        await app.open("crash")
        while (acked | set(again)) != produced:
            batch = (await app.next("batch")).batch
            for record in batch.records:
                again[(record.partition, record.offset)] = record.delivery_attempt
            app.ack(batch_ids=[batch.batch_id])
        await wait_all_committed(kafka, group_id, topic)
        app.close()
    duplicates = received & set(again)
    line = figures(
        "sidecar kill -9",
        produced=len(produced),
        acked=len(acked | set(again)),
        in_flight_at_kill=len(unacked),
        acked_not_committed_at_kill=len(acked_uncommitted),
        duplicated=len(duplicates),
    )
    assert acked | set(again) == produced, line
    # Duplicates are exactly the records unsettled at the kill.
    assert duplicates == unacked, line
    assert set(again) == {(p, o) for p, o in produced if o >= at_kill[p]} - acked, line


_DOOMED_APP = """
import asyncio, json, sys

import grpc
from kafkasidecar.v1 import consumer_pb2 as pb
from kafkasidecar.v1 import consumer_pb2_grpc as pb_grpc


async def main(target: str, subscription: str, ack_batches: int) -> None:
    # Acks its first `ack_batches` batches, then holds every batch it gets (until killed).
    requests = asyncio.Queue()
    requests.put_nowait(
        pb.ConsumeRequest(open=pb.Open(subscription=subscription, client_id="doomed-app"))
    )

    async def outgoing():
        while True:
            yield await requests.get()

    acked = 0
    async with grpc.aio.insecure_channel(target) as channel:
        call = pb_grpc.ConsumerServiceStub(channel).Consume(outgoing())
        async for response in call:
            if response.WhichOneof("kind") != "batch":
                continue
            batch = response.batch
            event = "held"
            if acked < ack_batches:
                requests.put_nowait(pb.ConsumeRequest(ack=pb.Ack(batch_ids=[batch.batch_id])))
                acked += 1
                event = "acked"
            records = [[r.partition, r.offset, r.delivery_attempt] for r in batch.records]
            print(json.dumps({"event": event, "records": records}), flush=True)


asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""


async def test_app_kill_9_hands_its_unsettled_records_to_the_next_stream(
    kafka: LocalKafka,
    new_topic: TopicFactory,
    producer: AIOKafkaProducer,
    start_sidecar: StartSidecar,
    tmp_path: Path,
) -> None:
    topic = await new_topic(partitions=4)
    produced = set(await produce(producer, topic, 1000, partitions=4))
    sub = group_subscription(
        "doomed",
        topic,
        batch={"max_records": 25, "max_wait_ms": 50},
        window={"max_outstanding_batches": 4},
    )
    group_id = sub["group_id"]
    sidecar = await start_sidecar([sub], listener="plaintext")
    script = tmp_path / "doomed_app.py"
    script.write_text(_DOOMED_APP)
    ack_batches = 8
    app_proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        sidecar.address,
        "doomed",
        str(ack_batches),
        stdout=asyncio.subprocess.PIPE,
    )
    acked: set[Key] = set()
    held: set[Key] = set()
    held_batches = 0
    try:
        assert app_proc.stdout is not None
        # Ordering by partition and 4 partitions: the window (4 batches) fills with one
        # held batch per partition.
        while held_batches < 4:
            output = await asyncio.wait_for(app_proc.stdout.readline(), 60)
            assert output, "the app exited"
            event = json.loads(output)
            keys = {(p, o) for p, o, _attempt in event["records"]}
            if event["event"] == "acked":
                acked |= keys
            else:
                held |= keys
                held_batches += 1
        # Its acks are in: Kafka's commit point is at the held records.
        await wait_committed(kafka, group_id, lowest_unacked(produced, acked))
        app_proc.kill()
        assert await asyncio.wait_for(app_proc.wait(), 30) == -signal.SIGKILL
    finally:
        if app_proc.returncode is None:
            app_proc.kill()
            await app_proc.wait()

    attempts: dict[Key, int] = {}
    async with grpc.aio.insecure_channel(sidecar.address) as channel:
        app = AppStream(channel, keep=False)
        await app.open("doomed")
        while (acked | set(attempts)) != produced:
            batch = (await app.next("batch")).batch
            for record in batch.records:
                key = (record.partition, record.offset)
                assert key not in attempts, f"{key} delivered twice to the second app"
                attempts[key] = record.delivery_attempt
            app.ack(batch_ids=[batch.batch_id])
        await wait_all_committed(kafka, group_id, topic)
        app.close()
    redelivered = {key for key, attempt in attempts.items() if attempt >= 2}
    line = figures(
        "app kill -9",
        produced=len(produced),
        acked_by_killed_app=len(acked),
        held_at_kill=len(held),
        acked_by_next_app=len(attempts),
        duplicated=len(set(attempts) & (acked | held)),
    )
    assert set(attempts) == produced - acked, line
    assert redelivered == held, line
    assert {attempts[key] for key in held} == {2}, line


async def test_two_sidecars_one_restarted_and_killed_repeatedly_lose_nothing(
    kafka: LocalKafka,
    new_topic: TopicFactory,
    producer: AIOKafkaProducer,
    start_sidecar: StartSidecar,
) -> None:
    total, chunk, partitions = 50_000, 1000, 6
    window_records = 400
    # Each app takes 0.2 s per batch (in parallel up to its window), so a stop or a kill
    # always finds batches in flight.
    processing = 0.2
    topic = await new_topic(partitions=partitions)
    sub = group_subscription(
        "pair",
        topic,
        batch={"max_records": 100, "max_wait_ms": 50},
        window={"max_outstanding_batches": 4, "max_outstanding_records": window_records},
        consumer=FAST_GROUP,
        revoke_grace_ms=2000,
    )
    group_id = sub["group_id"]
    tally = Tally()
    produced: set[Key] = set()
    backwards: list[str] = []
    polls = 0
    per_cycle: list[int] = []
    stop_watching = asyncio.Event()

    async def produce_chunks(count: int) -> None:
        for _ in range(count):
            produced.update(await produce(producer, topic, chunk, partitions=partitions))
            await asyncio.sleep(0.4)

    async def watch_commits() -> None:
        """Kafka's committed offsets, every ~0.5 s: they may only move forward."""
        nonlocal polls
        last: dict[int, int] = {}
        while not stop_watching.is_set():
            now = await committed(kafka, group_id)
            polls += 1
            for partition, offset in now.items():
                if offset < last.get(partition, 0):
                    backwards.append(f"partition {partition}: {last[partition]} -> {offset}")
            last.update(now)
            await asyncio.sleep(0.5)

    steady = await start_sidecar([sub], listener="plaintext")
    started = time.monotonic()
    cycles = ["kill", "term", "kill", "term", "kill"]
    async with grpc.aio.insecure_channel(steady.address) as steady_channel:
        steady_app = AppStream(steady_channel, keep=False)
        await steady_app.open("pair")
        steady_acking = asyncio.create_task(ack_everything(steady_app, tally, processing, "steady"))
        watching = asyncio.create_task(watch_commits())
        try:
            for cycle, how in enumerate(cycles, 1):
                other = await start_sidecar([sub], listener="plaintext")
                assert other.proc is not None
                async with grpc.aio.insecure_channel(other.address) as channel:
                    app = AppStream(channel, keep=False)
                    await app.open("pair")
                    acking = asyncio.create_task(
                        ack_everything(app, tally, processing, f"{cycle}:{how}")
                    )
                    # This cycle's share is produced over ~5 s; the stop or kill comes in the
                    # middle of it, with batches in flight.
                    producing = asyncio.create_task(produce_chunks(total // chunk // len(cycles)))
                    await asyncio.sleep(2.5)
                    if how == "kill":
                        other.proc.kill()
                        assert await asyncio.to_thread(other.wait, 30) == -signal.SIGKILL
                    else:
                        other.signal(signal.SIGTERM)
                        assert await asyncio.to_thread(other.wait, 60) == 0, other.logs()[-3000:]
                    per_cycle.append(await asyncio.wait_for(acking, 30))
                    app.close()
                    await producing
                await asyncio.sleep(2)
            await wait_until(
                lambda: tally.acked >= produced,
                90,
                lambda: f"{len(produced - tally.acked)} of {len(produced)} never acked",
            )
            await wait_all_committed(kafka, group_id, topic)
        finally:
            stop_watching.set()
            watching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watching
            steady_app.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(steady_acking, 10)
            steady_acking.cancel()
    # A duplicate is charged to the stream that had the record first. Per kill: what the
    # killed sidecar's app held (at most its window) plus what it had acked since the last
    # commit (one commit interval's flow: ~400 records here, taken as another window). Clean
    # stops and rebalances let the app settle and commit first, so they may add none.
    per_kill = 2 * window_records
    bound = cycles.count("kill") * per_kill
    line = figures(
        "two sidecars, one cycled",
        produced=len(produced),
        acked=len(tally.acked),
        duplicated=tally.duplicates,
        duplicate_bound=bound,
        duplicated_by_first_holder=dict(sorted(tally.duplicates_by.items())),
        cycles=",".join(cycles),
        records_per_cycle=per_cycle,
        commit_polls=polls,
        rebalances_seen_by_apps=tally.kinds["partitions_revoked"],
        seconds=round(time.monotonic() - started),
    )
    assert len(produced) == total
    assert tally.acked == produced, line
    assert not backwards, f"committed offsets moved backwards: {backwards}"
    assert all(per_cycle), f"{line}: the cycled sidecar got no records in some cycle"
    assert tally.duplicates <= bound, line
    charged = dict(tally.duplicates_by)
    assert all(n <= per_kill for n in charged.values()), line
    assert all(stream.endswith(":kill") for stream in charged), f"{line}: not only kills"


async def test_sigterm_commits_the_acks_made_during_the_grace(
    kafka: LocalKafka,
    new_topic: TopicFactory,
    producer: AIOKafkaProducer,
    start_sidecar: StartSidecar,
) -> None:
    topic = await new_topic(partitions=3)
    produced = set(await produce(producer, topic, 600, partitions=3))
    sub = group_subscription("term", topic, batch={"max_records": 20, "max_wait_ms": 50})
    group_id = sub["group_id"]
    grace = {"shutdown_grace_ms": 4000}
    sidecar = await start_sidecar([sub], listener="plaintext", extra=grace)
    acked: set[Key] = set()
    async with grpc.aio.insecure_channel(sidecar.address) as channel:
        app = AppStream(channel)
        await app.open("term")
        for _ in range(6):
            batch = (await app.next("batch")).batch
            app.ack(batch_ids=[batch.batch_id])
            acked.update(keys_of(batch))
        # Then hold: under partition ordering the stream is full at one batch per partition.
        held: dict[int, pb.Batch] = {}
        while len(held) < 3:
            batch = (await app.next("batch")).batch
            held[batch.records[0].partition] = batch
        sidecar.signal(signal.SIGTERM)
        await app.next("draining", timeout=30)
        draining_at = len(app.received)
        # During the grace: ack all but one of the held batches.
        kept = held.pop(2)
        for batch in held.values():
            app.ack(batch_ids=[batch.batch_id])
            acked.update(keys_of(batch))
        assert await asyncio.to_thread(sidecar.wait, 60) == 0, sidecar.logs()[-3000:]
        with contextlib.suppress(grpc.aio.AioRpcError, AssertionError, TimeoutError):
            while True:
                await app.next(timeout=10)
    after_draining = [r.WhichOneof("kind") for r in app.received[draining_at:]]
    assert "batch" not in after_draining, "batches after draining"
    assert "rejected" not in after_draining, "acks refused during the grace"
    # Kafka's view: the commit covers every ack, the grace's included, and stops at `kept`.
    expected = lowest_unacked(produced, acked)
    assert expected[2] == kept.records[0].offset
    await wait_committed(kafka, group_id, expected, timeout=10)

    restarted = await start_sidecar([sub], listener="plaintext")
    again = await ack_the_rest(kafka, restarted, sub, topic, produced, acked)
    line = figures(
        "SIGTERM with records in flight",
        produced=len(produced),
        acked_before_sigterm=len(acked) - sum(len(b.records) for b in held.values()),
        acked_during_grace=sum(len(b.records) for b in held.values()),
        unacked_at_exit=len(kept.records),
        duplicated=len(again & acked),
        redelivered_unacked=len(again & set(keys_of(kept))),
    )
    assert again == produced - acked, line


async def test_acks_during_the_grace_are_committed_before_it_ends(
    kafka: LocalKafka,
    new_topic: TopicFactory,
    producer: AIOKafkaProducer,
    start_sidecar: StartSidecar,
) -> None:
    """Commits go on through the shutdown grace: when Kubernetes kills the sidecar at its
    end (kill -9 after terminationGracePeriodSeconds), only what was never acked replays."""
    topic = await new_topic(partitions=3)
    produced = set(await produce(producer, topic, 300, partitions=3))
    sub = group_subscription("grace", topic, batch={"max_records": 20, "max_wait_ms": 50})
    group_id = sub["group_id"]
    sidecar = await start_sidecar([sub], listener="plaintext", extra={"shutdown_grace_ms": 60000})
    acked: set[Key] = set()
    async with grpc.aio.insecure_channel(sidecar.address) as channel:
        app = AppStream(channel)
        await app.open("grace")
        held: dict[int, pb.Batch] = {}
        while len(held) < 3:  # one batch per partition under partition ordering
            batch = (await app.next("batch")).batch
            held[batch.records[0].partition] = batch
        sidecar.signal(signal.SIGTERM)
        await app.next("draining", timeout=30)
        kept = held.pop(2)
        for batch in held.values():
            app.ack(batch_ids=[batch.batch_id])
            acked.update(keys_of(batch))
        # Still within the grace (the app holds `kept`): the acks are committed already.
        await wait_committed(kafka, group_id, lowest_unacked(produced, acked), timeout=30)
        assert sidecar.proc is not None
        assert sidecar.proc.poll() is None, "the grace ended before the test could look"
        sidecar.signal(signal.SIGKILL)
        await asyncio.to_thread(sidecar.wait, 30)
        app.cancel()
    restarted = await start_sidecar([sub], listener="plaintext")
    again = await ack_the_rest(kafka, restarted, sub, topic, produced, acked)
    assert not again & acked, "acks made during the grace were replayed"
    assert set(keys_of(kept)) <= again


async def test_detach_leaves_the_group_and_a_new_stream_rejoins(
    kafka: LocalKafka,
    new_topic: TopicFactory,
    producer: AIOKafkaProducer,
    start_sidecar: StartSidecar,
) -> None:
    topic = await new_topic(partitions=2)
    produced = set(await produce(producer, topic, 200, partitions=2))
    sub = group_subscription(
        "detach", topic, batch={"max_records": 20, "max_wait_ms": 50}, detach_timeout_ms=2000
    )
    group_id = sub["group_id"]
    sidecar = await start_sidecar([sub], listener="plaintext")
    acked: set[Key] = set()
    async with grpc.aio.insecure_channel(sidecar.address) as channel:
        app = AppStream(channel, keep=False)
        await app.open("detach")
        (member,) = await wait_group(kafka, group_id, 1, "Stable")
        received: set[Key] = set()
        last: pb.Batch | None = None
        while received != produced:
            if last is not None:
                app.ack(batch_ids=[last.batch_id])
                acked.update(keys_of(last))
            last = (await app.next("batch")).batch
            received.update(keys_of(last))
        # The only stream ends, still holding its last batch.
        app.close()
        with contextlib.suppress(AssertionError, grpc.aio.AioRpcError):
            await app.next(timeout=10)
    assert await wait_group(kafka, group_id, 0, "Empty") == []
    assert "left the group" in sidecar.logs()
    await wait_committed(kafka, group_id, lowest_unacked(produced, acked))

    produced |= set(await produce(producer, topic, 100, partitions=2))
    async with grpc.aio.insecure_channel(sidecar.address) as channel:
        app = AppStream(channel, keep=False)
        await app.open("detach")
        await wait_group(kafka, group_id, 1, "Stable")
        again: set[Key] = set()
        while (acked | again) != produced:
            batch = (await app.next("batch")).batch
            again.update(keys_of(batch))
            app.ack(batch_ids=[batch.batch_id])
        await wait_all_committed(kafka, group_id, topic)
        app.close()
    line = figures(
        "detach and rejoin",
        produced=len(produced),
        acked=len(acked | again),
        duplicated=len(again & received),
        first_member=member,
    )
    assert again == produced - acked, line


async def test_msk_session_ends_for_two_minutes_under_load_lose_nothing_and_keep_the_group(
    kafka: LocalKafka,
    new_topic: TopicFactory,
    producer: AIOKafkaProducer,
    start_sidecar: StartSidecar,
) -> None:
    """The ~120 s test: the short-session IAM key makes the broker end every connection's
    session after ~10 s (as MSK does every token lifetime), while records flow all along."""
    duration_s = 120.0
    topic = await new_topic(partitions=2)
    sub = group_subscription("msk", topic, batch={"max_records": 100, "max_wait_ms": 200})
    group_id = sub["group_id"]
    env = aws_env(kafka)
    env.update(
        AWS_ACCESS_KEY_ID=kafka.short_session_access_key_id,
        AWS_SECRET_ACCESS_KEY=kafka.short_session_secret_access_key,
    )
    sidecar = await start_sidecar([sub], listener="iam", env=env)
    tally = Tally()
    produced: set[Key] = set()

    async def produce_for(seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            produced.update(await produce(producer, topic, 50, partitions=2))
            await asyncio.sleep(0.5)

    async with grpc.aio.insecure_channel(sidecar.address) as channel:
        app = AppStream(channel, keep=False)
        await app.open("msk")
        acking = asyncio.create_task(ack_everything(app, tally))
        try:
            members = await wait_group(kafka, group_id, 1, "Stable")
            await produce_for(duration_s)
            await wait_until(
                lambda: tally.acked >= produced,
                60,
                lambda: f"{len(produced - tally.acked)} of {len(produced)} never acked",
            )
            await wait_all_committed(kafka, group_id, topic)
            group_at_end = await describe_group(kafka, group_id)
        finally:
            app.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(acking, 10)
            acking.cancel()
    lines = [json.loads(x) for x in sidecar.logs().splitlines() if x.startswith("{")]
    errors = [x for x in lines if x.get("level") == "error"]
    warnings = [x for x in lines if x.get("level") == "warning"]
    reconnects = [x for x in lines if "Connection at " in x.get("msg", "")]
    line = figures(
        "MSK session end every ~10 s for 2 min",
        produced=len(produced),
        acked=len(tally.acked),
        duplicated=tally.duplicates,
        session_ms=kafka.short_session_ms,
        connection_closed_lines=len(reconnects),
        warning_lines=len(warnings),
        error_lines=len(errors),
        rebalances=tally.kinds["partitions_revoked"],
    )
    assert tally.acked == produced, line
    assert group_at_end == ("Stable", members), f"{line}; group {group_at_end} != {members}"
    assert tally.kinds["partitions_revoked"] == 0, line
    assert tally.duplicates == 0, f"{line}: redelivered without a rebalance or a crash"
    assert reconnects, f"{line}: the broker never ended a session?"
    # Reconnects are routine on MSK: info lines, never errors.
    assert not errors, f"{line}: {errors[:5]}"
