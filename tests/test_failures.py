"""Failure semantics: nacks, retries, dead letters, ack deadlines and rebalances, end to end."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import grpc
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kafkasidecar.v1 import consumer_pb2 as pb
from kafkasidecar.v1 import consumer_pb2_grpc as pb_grpc
from sidecar.ledger import decode_settled
from tests.localkafka import LocalKafka, committed_offsets, end_offsets
from tests.sidecarproc import AppStream, SidecarProcess, group_subscription, ref
from tests.test_delivery import produce, wait_committed

TopicFactory = Callable[..., Awaitable[str]]
StartSidecar = Callable[..., Awaitable[SidecarProcess]]


async def read_topic(kafka: LocalKafka, topic: str, count: int) -> list[object]:
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka.plaintext, enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topic) or {0}
        tps = [TopicPartition(topic, p) for p in partitions]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        records: list[object] = []
        async with asyncio.timeout(60):
            while len(records) < count:
                for batch in (await consumer.getmany(timeout_ms=500)).values():
                    records.extend(batch)
        return records
    finally:
        await consumer.stop()


async def health_of(sidecar: SidecarProcess, service: str) -> int:
    async with grpc.aio.insecure_channel(sidecar.address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
        return int(reply.status)


async def wait_health(sidecar: SidecarProcess, service: str, status: int, timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while await health_of(sidecar, service) != status:
            await asyncio.sleep(0.2)


def nack(
    records: list[pb.Record],
    action: int = pb.NACK_ACTION_RETRY,
    reason: str = "",
    retry_after_ms: int = 0,
) -> pb.ConsumeRequest:
    return pb.ConsumeRequest(
        nack=pb.Nack(
            records=[ref(r) for r in records],
            action=action,  # type: ignore[arg-type]
            reason=reason,
            retry_after_ms=retry_after_ms,
        )
    )


async def test_poison_record_goes_to_the_dlq_with_every_header_and_the_rest_flows(
    kafka: LocalKafka,
    new_topic: TopicFactory,
    producer: AIOKafkaProducer,
    start_sidecar: StartSidecar,
) -> None:
    topic, dlq = await new_topic(partitions=1), await new_topic(partitions=1)
    for i in range(10):
        headers = [("trace", b"t-1"), ("trace", b"t-2")] if i == 3 else []
        await producer.send_and_wait(topic, f"v{i}".encode(), key=f"k{i}".encode(), headers=headers)
    sub = group_subscription("poison", topic, dead_letter={"topic": dlq})
    sidecar = await start_sidecar([sub], listener="plaintext")
    async with grpc.aio.insecure_channel(sidecar.address) as channel:
        app = AppStream(channel)
        await app.open("poison")
        seen: list[pb.Record] = []
        while len(seen) < 10:
            batch = (await app.next("batch")).batch
            seen.extend(batch.records)
            poison = [r for r in batch.records if r.offset == 3]
            app.send(nack(poison, pb.NACK_ACTION_DEAD_LETTER, reason="cannot parse receipt"))
            app.ack(records=[ref(r) for r in batch.records if r.offset != 3])
        await wait_committed(kafka, sub["group_id"], topic)
        (letter,) = await read_topic(kafka, dlq, 1)
        poison_record = next(r for r in seen if r.offset == 3)

        # The rest of the partition keeps flowing after the poison record.
        await producer.send_and_wait(topic, b"after", key=b"after")
        batch = (await app.next("batch")).batch
        assert [r.value for r in batch.records] == [b"after"]
        app.ack(batch_ids=[batch.batch_id])
        app.close()

    assert (letter.key, letter.value) == (b"k3", b"v3")  # type: ignore[attr-defined]
    headers = list(letter.headers)  # type: ignore[attr-defined]
    assert headers[:2] == [("trace", b"t-1"), ("trace", b"t-2")], "original headers first"
    dlq_headers = dict(headers[2:])
    failed_at = int(dlq_headers.pop("x-dlq-failed-at"))
    assert abs(failed_at - time.time() * 1000) < 600_000
    assert dlq_headers == {
        "x-dlq-original-topic": topic.encode(),
        "x-dlq-original-partition": b"0",
        "x-dlq-original-offset": b"3",
        "x-dlq-original-timestamp": str(poison_record.timestamp_ms).encode(),
        "x-dlq-consumer-group": sub["group_id"].encode(),
        "x-dlq-reason": b"cannot parse receipt",
        "x-dlq-attempts": b"1",
    }


async def test_retries_back_off_in_order_then_dead_letter(
    kafka: LocalKafka,
    new_topic: TopicFactory,
    producer: AIOKafkaProducer,
    start_sidecar: StartSidecar,
) -> None:
    topic, dlq = await new_topic(partitions=1), await new_topic(partitions=1)
    await produce(producer, topic, 10)
    sub = group_subscription(
        "retry",
        topic,
        batch={"max_records": 5, "max_wait_ms": 50},
        retry={
            "max_attempts": 3,
            "initial_backoff_ms": 400,
            "multiplier": 2,
            "max_backoff_ms": 2000,
        },
        dead_letter={"topic": dlq},
    )
    sidecar = await start_sidecar([sub], listener="plaintext")
    attempts: list[int] = []
    nacked_at: list[float] = []
    redelivered_after: list[float] = []
    order: list[tuple[int, int]] = []
    async with grpc.aio.insecure_channel(sidecar.address) as channel:
        app = AppStream(channel)
        await app.open("retry")
        delivered: set[int] = set()
        while len(delivered) < 9 or len(attempts) < 3:
            batch = (await app.next("batch")).batch
            now = time.monotonic()
            for record in batch.records:
                order.append((record.offset, record.delivery_attempt))
                if record.offset == 0:
                    if nacked_at:
                        redelivered_after.append(now - nacked_at[-1])
                    attempts.append(record.delivery_attempt)
                    nacked_at.append(now)
                    app.send(nack([record], reason="downstream 503"))
                else:
                    delivered.add(record.offset)
                    app.ack(records=[ref(record)])
        await wait_committed(kafka, sub["group_id"], topic)
        app.close()

    assert attempts == [1, 2, 3]
    # Backoff with jitter lies in [ceiling/2, ceiling]: 400 ms, then 800 ms, loosely checked.
    assert redelivered_after[0] >= 0.15
    assert redelivered_after[1] >= 0.3
    # Partition ordering: nothing after offset 0 is delivered until its retry went out again.
    first_redelivery = order.index((0, 2))
    assert all(offset < 5 for offset, _ in order[:first_redelivery])
    (letter,) = await read_topic(kafka, dlq, 1)
    headers = dict(letter.headers)  # type: ignore[attr-defined]
    assert headers["x-dlq-attempts"] == b"3"
    assert b"downstream 503" in headers["x-dlq-reason"]


async def test_ack_deadline_redelivers_and_stale_acks_are_rejected(
    kafka: LocalKafka,
    new_topic: TopicFactory,
    producer: AIOKafkaProducer,
    start_sidecar: StartSidecar,
) -> None:
    topic = await new_topic(partitions=1)
    await produce(producer, topic, 3)
    sub = group_subscription(
        "deadline", topic, ack_deadline_ms=1000, retry={"initial_backoff_ms": 0}
    )
    sidecar = await start_sidecar([sub], listener="plaintext")
    async with grpc.aio.insecure_channel(sidecar.address) as channel:
        app = AppStream(channel)
        await app.open("deadline")
        first = (await app.next("batch")).batch
        assert {r.delivery_attempt for r in first.records} == {1}
        again = (await app.next("batch")).batch
        assert [r.offset for r in again.records] == [r.offset for r in first.records]
        assert {r.delivery_attempt for r in again.records} == {2}
        app.ack(batch_ids=[first.batch_id])
        rejected = (await app.next("rejected")).rejected
        assert list(rejected.batch_ids) == [first.batch_id]
        assert rejected.reason == pb.REJECT_REASON_EXPIRED
        app.ack(batch_ids=[again.batch_id])
        await wait_committed(kafka, sub["group_id"], topic)
        app.close()


async def test_dead_letter_nack_without_a_dlq_is_rejected_and_nothing_is_lost(
    kafka: LocalKafka,
    new_topic: TopicFactory,
    producer: AIOKafkaProducer,
    start_sidecar: StartSidecar,
) -> None:
    topic = await new_topic(partitions=1)
    await produce(producer, topic, 2)
    sub = group_subscription("nodlq", topic)
    sidecar = await start_sidecar([sub], listener="plaintext")
    async with grpc.aio.insecure_channel(sidecar.address) as channel:
        app = AppStream(channel)
        await app.open("nodlq")
        batch = (await app.next("batch")).batch
        app.send(nack(list(batch.records), pb.NACK_ACTION_DEAD_LETTER))
        rejected = (await app.next("rejected")).rejected
        assert rejected.reason == pb.REJECT_REASON_INVALID
        assert "dead_letter" in rejected.message
        # The records are still the app's to settle.
        app.ack(batch_ids=[batch.batch_id])
        await wait_committed(kafka, sub["group_id"], topic)
        app.close()


def test_missing_dlq_topic_fails_at_start_naming_the_key(kafka: LocalKafka) -> None:
    sub = group_subscription("s", "any-topic", dead_letter={"topic": "no-such-dlq-topic"})
    sidecar = SidecarProcess(kafka, [sub], listener="plaintext").start()
    assert sidecar.wait(60) == 1
    assert "subscriptions[0].dead_letter.topic" in sidecar.logs()
    assert "no-such-dlq-topic" in sidecar.logs()


async def test_failing_dlq_blocks_the_commit_until_it_recovers(
    kafka: LocalKafka,
    new_topic: TopicFactory,
    producer: AIOKafkaProducer,
    start_sidecar: StartSidecar,
) -> None:
    topic, dlq = await new_topic(partitions=1), await new_topic(partitions=1)
    await produce(producer, topic, 5)
    sub = group_subscription("dlqdown", topic, dead_letter={"topic": dlq})
    sidecar = await start_sidecar(
        [sub],
        listener="plaintext",
        extra={"kafka": {"bootstrap_servers": [kafka.plaintext], "request_timeout_ms": 3000}},
    )
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.plaintext)
    await admin.start()
    try:
        await admin.delete_topics([dlq])
        async with grpc.aio.insecure_channel(sidecar.address) as channel:
            app = AppStream(channel)
            await app.open("dlqdown")
            batch = (await app.next("batch")).batch
            assert len(batch.records) == 5
            app.send(nack([batch.records[2]], pb.NACK_ACTION_DEAD_LETTER, reason="poison"))
            app.ack(records=[ref(r) for r in batch.records if r.offset != 2])

            # The DLQ write fails: the subscription says so, and no commit passes offset 2.
            await wait_health(sidecar, "dlqdown", health_pb2.HealthCheckResponse.NOT_SERVING, 90)
            for _ in range(5):
                committed = (await committed_offsets(kafka, sub["group_id"])).get((topic, 0), 0)
                assert committed <= 2
                await asyncio.sleep(0.5)

            await admin.create_topics([NewTopic(dlq, 1, 1)])
            await wait_committed(kafka, sub["group_id"], topic, timeout=120)
            await wait_health(sidecar, "dlqdown", health_pb2.HealthCheckResponse.SERVING, 60)
            app.close()
        (letter,) = await read_topic(kafka, dlq, 1)
        assert dict(letter.headers)["x-dlq-original-offset"] == b"2"  # type: ignore[attr-defined]
        assert (await end_offsets(kafka, topic))[(topic, 0)] == 5
    finally:
        await admin.close()


async def test_revoke_grace_commits_acks_made_during_the_rebalance(
    kafka: LocalKafka,
    new_topic: TopicFactory,
    producer: AIOKafkaProducer,
    start_sidecar: StartSidecar,
) -> None:
    topic = await new_topic(partitions=2)
    await produce(producer, topic, 40, partitions=2)
    sub = group_subscription(
        "rebalance",
        topic,
        ordering="none",
        revoke_grace_ms=4000,
        batch={"max_records": 5, "max_wait_ms": 50},
        consumer={"session_timeout_ms": 10000, "heartbeat_interval_ms": 500},
    )
    first = await start_sidecar([sub], listener="plaintext")
    async with grpc.aio.insecure_channel(first.address) as channel:
        app = AppStream(channel)
        await app.open("rebalance", max_outstanding_batches=2)
        held = [(await app.next("batch")).batch for _ in range(2)]
        # A second member joins: the first must give its partitions up (eager rebalance).
        second = asyncio.ensure_future(start_sidecar([sub], listener="plaintext"))
        await asyncio.sleep(1.0)
        settled = held[0]
        app.ack(batch_ids=[settled.batch_id])  # during the revoke grace
        revoked = (await app.next("partitions_revoked", timeout=60)).partitions_revoked
        assert revoked.partitions
        await second
        committed = await committed_offsets(kafka, sub["group_id"])
        for record in settled.records:
            assert committed.get((record.topic, record.partition), 0) > record.offset, (
                "an ack made during the grace was committed"
            )
        # The batch not settled in time now belongs to the partition's next owner.
        app.ack(batch_ids=[held[1].batch_id])
        rejected = (await app.next("rejected")).rejected
        assert rejected.reason == pb.REJECT_REASON_REVOKED
        assert list(rejected.batch_ids) == [held[1].batch_id]
        app.close()


async def test_acks_above_a_held_record_survive_a_kill_9(
    kafka: LocalKafka,
    new_topic: TopicFactory,
    producer: AIOKafkaProducer,
    start_sidecar: StartSidecar,
) -> None:
    """The committed offset stops at the lowest unsettled record; the acks above it ride in the
    commit's metadata, so a restarted sidecar redelivers only what was really unsettled."""
    topic = await new_topic(partitions=1)
    await produce(producer, topic, 20)
    sub = group_subscription(
        "memory",
        topic,
        ordering="none",
        batch={"max_records": 5, "max_wait_ms": 50},
        # The killed member never leaves: its session must time out before the restart joins.
        consumer={"session_timeout_ms": 6000, "heartbeat_interval_ms": 1000},
    )
    first = await start_sidecar([sub], listener="plaintext")
    async with grpc.aio.insecure_channel(first.address) as channel:
        app = AppStream(channel)
        await app.open("memory", max_outstanding_batches=10)
        held = (await app.next("batch")).batch
        acked = 0
        while acked < 20 - len(held.records):
            batch = (await app.next("batch")).batch
            app.ack(batch_ids=[batch.batch_id])
            acked += len(batch.records)
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka.plaintext)
        await admin.start()
        try:
            async with asyncio.timeout(60):
                while True:
                    offsets = await admin.list_consumer_group_offsets(sub["group_id"])
                    meta = offsets.get(TopicPartition(topic, 0))
                    # Until a commit carries every ack above the held batch (an earlier one may
                    # carry only some: those acked after it would rightly come back).
                    settled = decode_settled(meta.offset, meta.metadata) if meta else []
                    if sum(end - start for start, end in settled) == acked:
                        break
                    await asyncio.sleep(0.1)
        finally:
            await admin.close()
        assert meta.offset == held.records[0].offset
        assert first.proc is not None
        first.proc.kill()
        first.proc.wait()

    second = await start_sidecar([sub], listener="plaintext")
    async with grpc.aio.insecure_channel(second.address) as channel:
        app = AppStream(channel)
        await app.open("memory", max_outstanding_batches=10)
        again = (await app.next("batch")).batch
        assert [r.offset for r in again.records] == [r.offset for r in held.records]
        with pytest.raises(TimeoutError):
            await app.next("batch", timeout=3)  # nothing that was acked comes back
        app.ack(batch_ids=[again.batch_id])
        await wait_committed(kafka, sub["group_id"], topic)
        app.close()
    assert '"skipping records settled before the last commit"' in second.logs()


async def test_a_dead_letter_that_can_never_be_written_holds_only_its_own_partition(
    kafka: LocalKafka,
    new_topic: TopicFactory,
    start_sidecar: StartSidecar,
) -> None:
    """A 1.2 MB record dead-lettered to a DLQ topic limited to 1 MiB: the other partitions
    keep flowing and committing to their ends, the record stays unsettled (never dropped),
    the subscription is NOT_SERVING, and the error log names the record and the cause."""
    topic = await new_topic(partitions=3, config={"max.message.bytes": "4000000"})
    dlq = await new_topic(partitions=1, config={"max.message.bytes": "1048576"})
    big = AIOKafkaProducer(bootstrap_servers=kafka.plaintext, max_request_size=4 * 1024 * 1024)
    await big.start()
    try:
        for partition in range(3):
            for i in range(20):
                value = b"B" * 1_200_000 if (partition, i) == (0, 5) else b"v%d" % i
                await big.send_and_wait(topic, value, partition=partition)
    finally:
        await big.stop()
    sub = group_subscription("toobig", topic, dead_letter={"topic": dlq})
    sidecar = await start_sidecar([sub], listener="plaintext")
    async with grpc.aio.insecure_channel(sidecar.address) as channel:
        app = AppStream(channel)
        await app.open("toobig")
        seen = 0
        # Partition 0 is held at the unwritten letter (partition ordering): 6 of its records.
        while seen < 46:
            batch = (await app.next("batch")).batch
            seen += len(batch.records)
            poison = [r for r in batch.records if (r.partition, r.offset) == (0, 5)]
            if poison:
                app.send(nack(poison, pb.NACK_ACTION_DEAD_LETTER, reason="too big to handle"))
            app.ack(records=[ref(r) for r in batch.records if r not in poison])
        await wait_health(sidecar, "toobig", health_pb2.HealthCheckResponse.NOT_SERVING, 90)
        async with asyncio.timeout(90):
            while True:
                committed = await committed_offsets(kafka, sub["group_id"])
                if committed.get((topic, 1)) == 20 and committed.get((topic, 2)) == 20:
                    break
                await asyncio.sleep(0.3)
        assert committed.get((topic, 0), 0) <= 5, "nothing commits past the unwritten letter"
        logs = sidecar.logs()
        assert f"{topic}[0]@5" in logs
        assert "record_too_large" in logs
        reply = await pb_grpc.ConsumerServiceStub(channel).GetStatus(
            pb.GetStatusRequest(subscription="toobig"), timeout=10
        )
        (status,) = reply.subscriptions
        assert f"{topic}[0]@5 (record_too_large)" in status.state
        assert not status.serving
        app.close()
