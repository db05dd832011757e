"""The Python client (clients/python, `kafkasidecar.SidecarConsumer`) against a real sidecar."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import uuid
from collections.abc import Awaitable, Callable

import pytest
from aiokafka import AIOKafkaProducer

from kafkasidecar import (
    Batch,
    Connected,
    Draining,
    Event,
    PartitionsAssigned,
    PartitionsRevoked,
    Rejected,
    RejectReason,
    SidecarConsumer,
    SidecarUnavailableError,
    StreamError,
    StreamLostError,
    TopicPartition,
)
from tests.clienttools import produce, read_topic, wait_committed, wait_until
from tests.localkafka import LocalKafka, committed_offsets, end_offsets
from tests.sidecarproc import SidecarProcess, group_subscription

TopicFactory = Callable[..., Awaitable[str]]
StartSidecar = Callable[..., Awaitable[SidecarProcess]]

#: Fast rebalances: a killed sidecar's member leaves the group after 6 s, not 45.
QUICK_GROUP = {"session_timeout_ms": 6000, "heartbeat_interval_ms": 1000}


async def test_consume_and_ack_everything_commits_to_the_end_offsets(
    kafka: LocalKafka,
    new_topic: TopicFactory,
    producer: AIOKafkaProducer,
    start_sidecar: StartSidecar,
) -> None:
    topic = await new_topic(partitions=3)
    produced = await produce(producer, topic, 60, partitions=3)
    tombstone = await producer.send_and_wait(topic, None, key=b"gone", partition=0)
    produced[(tombstone.partition, tombstone.offset)] = b""
    sub = group_subscription("client-all", topic, batch={"max_records": 7, "max_wait_ms": 100})
    token = uuid.uuid4().hex
    sidecar = await start_sidecar([sub], listener="plaintext", auth_token=token)

    received: dict[tuple[int, int], bytes | None] = {}
    retried: list[int] = []
    async with SidecarConsumer(
        sidecar.address, "client-all", client_id="test-all", max_outstanding_batches=2, token=token
    ) as consumer:
        events = consumer.events()
        assert consumer.opened is not None
        assert consumer.opened.group_id == sub["group_id"]
        assert consumer.opened.max_outstanding_batches == 2
        n = 0
        async for batch in consumer:
            assert isinstance(batch, Batch)
            for record in batch:
                if record.delivery_attempt > 1:
                    retried.append(record.offset)
                else:
                    assert (record.partition, record.offset) not in received
                received[(record.partition, record.offset)] = record.value
                assert record.topic == topic
                if record.value is not None:
                    i = int(record.value.split(b"-")[1])
                    assert record.key == f"k{i}".encode()
                    assert record.headers == [("n", str(i).encode())]
                else:
                    assert record.key == b"gone"
            # Every way of settling: whole batches, single records, the consumer's ack(), and
            # one retry nack (redelivered with attempt 2, then acked).
            if n == 0:
                first, *rest = batch.records
                await first.nack(retry_after_ms=100)
                await consumer.ack(rest)
            elif n % 3 == 1:
                for record in batch:
                    await record.ack()
            else:
                await batch.ack()
            await batch.ack()  # settled already: sends nothing, raises nothing
            n += 1
            if len(received) == len(produced) and retried:
                break
        await wait_committed(kafka, sub["group_id"], topic)
    assert {k: (v or b"") for k, v in received.items()} == produced
    assert len(retried) == 1

    # The events iterator saw the stream open and the partitions arrive, and ended on close.
    seen: list[Event] = [event async for event in events]
    assert isinstance(seen[0], Connected)
    assert not seen[0].reconnected
    assigned = {tp for e in seen if isinstance(e, PartitionsAssigned) for tp in e.partitions}
    assert assigned == {TopicPartition(topic, p) for p in range(3)}

    # Errors that reconnecting cannot fix end the consumer at once.
    with pytest.raises(StreamError) as refused:
        async with SidecarConsumer(sidecar.address, "no-such-subscription", token=token):
            pass
    assert refused.value.code.name == "NOT_FOUND"
    with pytest.raises(StreamError) as refused:
        async with SidecarConsumer(sidecar.address, "client-all", token="wrong"):
            pass
    assert refused.value.code.name == "UNAUTHENTICATED"
    with pytest.raises(SidecarUnavailableError):
        async with SidecarConsumer(f"unix://{sidecar.dir}/nobody.sock", "x", reconnect=False):
            pass


async def test_nack_to_the_dead_letter_topic_with_headers_and_the_commit_passes_it(
    kafka: LocalKafka,
    new_topic: TopicFactory,
    producer: AIOKafkaProducer,
    start_sidecar: StartSidecar,
) -> None:
    topic = await new_topic(partitions=1)
    dlq = await new_topic(partitions=1)
    produced = await produce(producer, topic, 5)
    sub = group_subscription(
        "client-dlq", topic, dead_letter={"topic": dlq}, batch={"max_records": 5}
    )
    sidecar = await start_sidecar([sub], listener="plaintext")
    rejections: list[Rejected] = []
    async with SidecarConsumer(
        sidecar.address, "client-dlq", on_rejected=rejections.append
    ) as consumer:
        held: list[Batch] = []
        async for batch in consumer:
            held.append(batch)
            if sum(len(b) for b in held) >= 5:
                break
        records = [r for b in held for r in b]
        poison = next(r for r in records if r.offset == 2)
        await poison.nack(dead_letter=True, reason="cannot parse receipt")
        await consumer.ack(held)
        # The sidecar settles the poison record once the DLQ write is confirmed: then the
        # commit passes it. A sidecar that cannot dead-letter says so with `rejected`.
        ends = await end_offsets(kafka, topic)
        async with asyncio.timeout(60):
            while not rejections and await committed_offsets(kafka, sub["group_id"]) != ends:
                await asyncio.sleep(0.3)
        assert not rejections, f"the sidecar refused the dead-letter nack: {rejections}"

    (dead,) = await read_topic(kafka, dlq, 1)
    assert dead.value == produced[(0, 2)]
    assert dead.key == b"k2"
    headers = {k: v for k, v in dead.headers}
    assert headers["n"] == b"2"  # the original headers are kept
    assert headers["x-dlq-original-topic"] == topic.encode()
    assert headers["x-dlq-original-partition"] == b"0"
    assert headers["x-dlq-original-offset"] == b"2"
    assert headers["x-dlq-consumer-group"] == sub["group_id"].encode()
    assert headers["x-dlq-reason"] == b"cannot parse receipt"
    assert int(headers["x-dlq-attempts"]) >= 1
    assert int(headers["x-dlq-original-timestamp"]) > 0
    assert int(headers["x-dlq-failed-at"]) > 0


async def test_a_second_sidecar_joining_revokes_partitions_as_events(
    kafka: LocalKafka,
    new_topic: TopicFactory,
    producer: AIOKafkaProducer,
    start_sidecar: StartSidecar,
) -> None:
    topic = await new_topic(partitions=2)
    await produce(producer, topic, 20, partitions=2)
    sub = group_subscription(
        "client-rebalance",
        topic,
        batch={"max_records": 5, "max_wait_ms": 100},
        consumer=QUICK_GROUP,
        revoke_grace_ms=1000,
    )
    first_sidecar = await start_sidecar([sub], listener="plaintext")
    revoked: list[PartitionsRevoked] = []
    async with SidecarConsumer(
        first_sidecar.address, "client-rebalance", on_revoked=revoked.append
    ) as first:
        events = first.events()
        await wait_until(lambda: len(first.assignment) == 2, "both partitions")
        held = await anext(first)  # held, unsettled, across the rebalance

        await start_sidecar([sub], listener="plaintext")  # joins the group: a rebalance
        await wait_until(lambda: bool(revoked), "partitions_revoked on the first consumer")
        assert held.records[0].partition in {tp.partition for tp in revoked[0].partitions}
        # Acks for revoked records are refused, and say so, as events.
        await held.ack()
        rejected = None
        async with asyncio.timeout(60):
            async for event in events:
                if isinstance(event, Rejected):
                    rejected = event
                    break
        assert rejected is not None
        assert rejected.reason == RejectReason.REVOKED
        assert rejected.batch_ids == (held.id,)
        # The group settles with one partition on each sidecar.
        await wait_until(lambda: len(first.assignment) == 1, "the first keeps one partition")
        await events.aclose()


async def test_sidecar_restarts_mid_stream_and_the_client_reconnects_losing_nothing(
    kafka: LocalKafka,
    new_topic: TopicFactory,
    producer: AIOKafkaProducer,
    start_sidecar: StartSidecar,
) -> None:
    topic = await new_topic(partitions=2)
    produced = await produce(producer, topic, 40, partitions=2)
    sub = group_subscription(
        "client-restart", topic, batch={"max_records": 4, "max_wait_ms": 50}, consumer=QUICK_GROUP
    )
    sidecar = await start_sidecar([sub], listener="plaintext")
    acked: set[tuple[int, int]] = set()
    lost: list[Batch] = []
    # Batches number 3 and 6 wait for the test before being acked: it restarts the sidecar.
    gates = {3: asyncio.Event(), 6: asyncio.Event()}
    holding: asyncio.Queue[Batch] = asyncio.Queue()
    events: list[Event] = []
    consumer = SidecarConsumer(
        sidecar.address,
        "client-restart",
        max_outstanding_batches=1,
        initial_backoff=0.1,
        max_backoff=1.0,
        on_event=events.append,
    )

    async def app() -> None:
        n = 0
        async with consumer:
            async for batch in consumer:
                n += 1
                if n in gates:
                    holding.put_nowait(batch)
                    await gates[n].wait()
                try:
                    await batch.ack()
                except StreamLostError:
                    lost.append(batch)  # its records come again on the new stream
                    continue
                acked.update((r.partition, r.offset) for r in batch)

    task = asyncio.create_task(app())
    try:
        # 1. A graceful restart (SIGTERM): the app hears `draining`, settles what it holds.
        await holding.get()
        sidecar.signal(signal.SIGTERM)
        await wait_until(lambda: any(isinstance(e, Draining) for e in events), "draining")
        gates[3].set()
        assert await asyncio.to_thread(sidecar.wait, 60) == 0
        sidecar.start()
        await sidecar.wait_serving()

        # 2. A crash (SIGKILL) while the app holds a batch: that batch can no longer be acked.
        held = await holding.get()
        assert sidecar.proc is not None
        sidecar.proc.kill()
        await asyncio.to_thread(sidecar.wait, 60)
        await wait_until(lambda: not held.alive, "the client to see its stream end")
        gates[6].set()
        await wait_until(lambda: bool(lost), "the held batch's ack to fail")
        assert lost == [held]
        sidecar.start()
        await sidecar.wait_serving()

        await wait_until(lambda: acked == set(produced), "every record acked", timeout=120)
        await wait_committed(kafka, sub["group_id"], topic)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    reconnects = [e for e in events if isinstance(e, Connected) and e.reconnected]
    assert len(reconnects) >= 2


async def test_cancelling_mid_batch_drains_and_unsettled_records_are_redelivered(
    kafka: LocalKafka,
    new_topic: TopicFactory,
    producer: AIOKafkaProducer,
    start_sidecar: StartSidecar,
) -> None:
    topic = await new_topic(partitions=1)
    await produce(producer, topic, 10)
    sub = group_subscription("client-cancel", topic, batch={"max_records": 10, "max_wait_ms": 300})
    sidecar = await start_sidecar([sub], listener="plaintext")
    holding: asyncio.Future[Batch] = asyncio.get_running_loop().create_future()

    async def app() -> None:
        async with SidecarConsumer(
            sidecar.address, "client-cancel", max_outstanding_batches=1
        ) as consumer:
            async for batch in consumer:
                for record in batch.records[:4]:
                    await record.ack()
                holding.set_result(batch)
                await asyncio.Event().wait()  # "processing" the rest, until cancelled

    task = asyncio.create_task(app())
    first = await asyncio.wait_for(holding, 60)
    assert [r.offset for r in first] == list(range(10))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not first.alive

    async with SidecarConsumer(sidecar.address, "client-cancel") as consumer:
        again = await anext(consumer)
        assert [r.offset for r in again] == list(range(4, 10))
        assert {r.delivery_attempt for r in again} == {2}
        await again.ack()
        await wait_committed(kafka, sub["group_id"], topic)
    with pytest.raises(StreamLostError):
        await first.ack()


async def test_an_ack_after_the_deadline_is_rejected_and_logged_when_nobody_listens(
    new_topic: TopicFactory,
    producer: AIOKafkaProducer,
    start_sidecar: StartSidecar,
    caplog: pytest.LogCaptureFixture,
) -> None:
    topic = await new_topic(partitions=1)
    await produce(producer, topic, 3)
    sub = group_subscription(
        "client-late",
        topic,
        ack_deadline_ms=1000,
        retry={"initial_backoff_ms": 100, "max_backoff_ms": 200},
        batch={"max_records": 3},
    )
    sidecar = await start_sidecar([sub], listener="plaintext")
    async with SidecarConsumer(
        sidecar.address, "client-late", max_outstanding_batches=1
    ) as consumer:
        late = await anext(consumer)
        again = await anext(consumer)  # the deadline passed: redelivered as if nacked
        assert [r.offset for r in again] == [r.offset for r in late]
        assert {r.delivery_attempt for r in again} == {2}
        with caplog.at_level(logging.WARNING, logger="kafkasidecar.client"):
            await late.ack()  # too late: the sidecar refuses it, and nobody listens for that
            await wait_until(lambda: "Rejected(" in caplog.text, "the rejection's warning")
        (warning,) = [r for r in caplog.records if "Rejected(" in r.getMessage()]
        assert warning.levelno == logging.WARNING
        assert f"batch_ids=({late.id},)" in warning.getMessage()
        await again.ack()


async def test_an_app_started_before_its_sidecar_waits_for_it(
    kafka: LocalKafka, new_topic: TopicFactory, producer: AIOKafkaProducer
) -> None:
    topic = await new_topic(partitions=1)
    await produce(producer, topic, 3)
    sub = group_subscription("client-early", topic, batch={"max_wait_ms": 100})
    sidecar = SidecarProcess(kafka, [sub], listener="plaintext")  # not started yet
    events: list[Event] = []
    consumer = SidecarConsumer(
        sidecar.address,
        "client-early",
        initial_backoff=0.1,
        max_backoff=0.5,
        on_event=events.append,
    )
    starting = asyncio.create_task(consumer.start())
    try:
        await asyncio.sleep(1)
        assert not starting.done()  # retrying "connection refused", not failing
        sidecar.start()
        await asyncio.wait_for(starting, 90)
        batch = await anext(consumer)
        assert [r.offset for r in batch] == [0, 1, 2]
        await batch.ack()
        await wait_committed(kafka, sub["group_id"], topic)
    finally:
        await consumer.aclose()
        await asyncio.to_thread(sidecar.stop)
    assert isinstance(events[0], Connected)
