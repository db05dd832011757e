"""The delivery core end to end: real broker, real `kafka-sidecar run` process, real gRPC."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Awaitable, Callable

import grpc
import psutil
import pytest
from aiokafka import AIOKafkaProducer

from kafkasidecar.v1 import consumer_pb2 as pb
from tests.localkafka import LocalKafka, committed_offsets, describe_group, end_offsets
from tests.sidecarproc import AppStream, SidecarProcess, group_subscription, ref

TopicFactory = Callable[..., Awaitable[str]]
StartSidecar = Callable[..., Awaitable[SidecarProcess]]


async def produce(
    producer: AIOKafkaProducer, topic: str, count: int, *, size: int = 100, partitions: int = 1
) -> dict[tuple[int, int], bytes]:
    """Produces `count` records round-robin over partitions; returns (partition, offset)->value."""
    futures = []
    values = []
    for i in range(count):
        value = f"{i:08d}".encode().ljust(size, b".")
        values.append(value)
        futures.append(
            await producer.send(topic, value, key=f"k{i}".encode(), partition=i % partitions)
        )
    metas = await asyncio.gather(*futures)
    return {(m.partition, m.offset): v for m, v in zip(metas, values, strict=True)}


async def wait_committed(kafka: LocalKafka, group_id: str, topic: str, timeout: float = 60) -> None:
    ends = await end_offsets(kafka, topic)
    async with asyncio.timeout(timeout):
        while (await committed_offsets(kafka, group_id)) != ends:
            await asyncio.sleep(0.2)


async def test_records_reach_the_app_over_iam_and_shuffled_acks_commit_everything(
    kafka: LocalKafka,
    new_topic: TopicFactory,
    producer: AIOKafkaProducer,
    start_sidecar: StartSidecar,
) -> None:
    topic = await new_topic(partitions=4)
    produced = await produce(producer, topic, 10_000, partitions=4)
    sub = group_subscription(
        "receipts",
        topic,
        batch={"max_records": 250},
        window={"max_outstanding_batches": 8, "max_outstanding_records": 4000},
    )
    sidecar = await start_sidecar([sub], listener="iam")
    received: dict[tuple[int, int], bytes] = {}
    rng = random.Random(7)
    async with grpc.aio.insecure_channel(sidecar.address) as channel:
        app = AppStream(channel)
        opened = await app.open("receipts")
        assert opened.group_id == sub["group_id"]
        assert opened.mode == pb.SUBSCRIPTION_MODE_GROUP
        held: list[pb.Batch] = []
        while len(received) < len(produced):
            batch = (await app.next("batch")).batch
            for record in batch.records:
                assert record.delivery_attempt == 1
                assert (record.partition, record.offset) not in received
                received[(record.partition, record.offset)] = record.value
            held.append(batch)
            if len(held) >= 4 or len(received) == len(produced):
                # Settle out of order: some batches whole, others record by record, shuffled.
                rng.shuffle(held)
                for i, done in enumerate(held):
                    if i % 2:
                        app.ack(batch_ids=[done.batch_id])
                    else:
                        refs = [ref(r) for r in done.records]
                        rng.shuffle(refs)
                        app.ack(records=refs)
                held.clear()
        await wait_committed(kafka, sub["group_id"], topic)
        app.close()
    assert received == produced


async def test_batches_respect_limits_and_records_arrive_intact(
    kafka: LocalKafka,
    new_topic: TopicFactory,
    producer: AIOKafkaProducer,
    start_sidecar: StartSidecar,
) -> None:
    topic = await new_topic(partitions=1)
    sent: list[tuple[bytes | None, bytes | None, list[tuple[str, bytes | None]]]] = [
        (b"k-plain", b"v" * 300, [("h", b"1")]),
        (None, b"null key", []),
        (b"tombstone", None, [("a", b"x"), ("a", b"y"), ("a", b"x")]),
        (b"null-header", b"v", [("n", None), ("e", b"")]),
        (b"", b"", []),
    ]
    sent += [(f"k{i}".encode(), bytes([i % 256]) * 300, []) for i in range(30)]
    for key, value, headers in sent:
        await producer.send_and_wait(topic, value, key=key, headers=headers)

    sub = group_subscription(
        "limits", topic, batch={"max_records": 7, "max_bytes": 2000, "max_wait_ms": 300}
    )
    sidecar = await start_sidecar([sub], listener="plaintext")
    async with grpc.aio.insecure_channel(sidecar.address) as channel:
        app = AppStream(channel)
        await app.open("limits")
        records: list[pb.Record] = []
        while len(records) < len(sent):
            batch = (await app.next("batch")).batch
            sizes = [
                len(r.key) + len(r.value) + sum(len(h.key) + len(h.value) for h in r.headers)
                for r in batch.records
            ]
            assert 1 <= len(batch.records) <= 7
            assert sum(sizes) <= 2000 or len(batch.records) == 1
            records.extend(batch.records)
            app.ack(batch_ids=[batch.batch_id])

        for record, (key, value, headers) in zip(records, sent, strict=True):
            assert (record.topic, record.partition) == (topic, 0)
            assert (record.key if record.HasField("key") else None) == key
            assert (record.value if record.HasField("value") else None) == value
            assert [(h.key, h.value if h.HasField("value") else None) for h in record.headers] == [
                (k, v) for k, v in headers
            ]
            assert record.timestamp_ms > 0
            assert record.timestamp_type == pb.TIMESTAMP_TYPE_CREATE_TIME
        assert [r.offset for r in records] == list(range(len(sent)))

        # Fewer than max_records and max_bytes: the linger (max_wait_ms) sends them anyway.
        for i in range(3):
            await producer.send_and_wait(topic, b"late", key=f"late{i}".encode())
        batch = (await app.next("batch")).batch
        assert [r.key for r in batch.records] == [b"late0", b"late1", b"late2"]
        app.ack(batch_ids=[batch.batch_id])
        await wait_committed(kafka, sub["group_id"], topic)
        app.close()


async def test_flow_control_window_holds_and_a_stalled_app_keeps_the_group(
    kafka: LocalKafka,
    new_topic: TopicFactory,
    producer: AIOKafkaProducer,
    start_sidecar: StartSidecar,
) -> None:
    topic = await new_topic(partitions=2)
    await produce(producer, topic, 1000, size=1024, partitions=2)
    sub = group_subscription(
        "slow",
        topic,
        batch={"max_records": 50, "max_wait_ms": 100},
        consumer={
            "max_poll_interval_ms": 5000,
            "session_timeout_ms": 6000,
            "heartbeat_interval_ms": 1000,
        },
    )
    sidecar = await start_sidecar([sub], listener="plaintext")
    assert sidecar.proc is not None
    process = psutil.Process(sidecar.proc.pid)
    async with grpc.aio.insecure_channel(sidecar.address) as channel:
        app = AppStream(channel)
        opened = await app.open("slow", max_outstanding_batches=2)
        assert opened.max_outstanding_batches == 2
        first = [(await app.next("batch")).batch for _ in range(2)]
        rss_before = process.memory_info().rss
        state, members = await describe_group(kafka, sub["group_id"])
        assert (state, len(members)) == ("Stable", 1)

        # A 100k-record backlog (100 MiB) builds up while the app sits on its two batches
        # for more than twice max_poll_interval_ms.
        await produce(producer, topic, 100_000, size=1024, partitions=2)
        with pytest.raises(TimeoutError):
            await app.next("batch", timeout=12)
        growth = process.memory_info().rss - rss_before
        assert growth < 64 * 1024 * 1024, f"RSS grew {growth / 2**20:.0f} MiB with the backlog"
        assert not [r for r in app.received if r.WhichOneof("kind") == "partitions_revoked"]
        assert "partitions revoked" not in sidecar.logs()

        # Same member, never kicked out: no rebalance happened.
        assert await describe_group(kafka, sub["group_id"]) == ("Stable", members)

        # Settling opens the window again.
        app.ack(batch_ids=[b.batch_id for b in first])
        more = (await app.next("batch")).batch
        assert more.records
        app.close()


async def test_partition_ordering_holds_a_partition_until_it_is_settled(
    new_topic: TopicFactory, producer: AIOKafkaProducer, start_sidecar: StartSidecar
) -> None:
    topic = await new_topic(partitions=3)
    await produce(producer, topic, 90, partitions=3)
    sub = group_subscription("ordered", topic, batch={"max_records": 5, "max_wait_ms": 50})
    sidecar = await start_sidecar([sub], listener="plaintext")
    async with grpc.aio.insecure_channel(sidecar.address) as channel:
        app = AppStream(channel)
        await app.open("ordered", max_outstanding_batches=10)
        held: list[pb.Batch] = []
        next_offset = {0: 0, 1: 0, 2: 0}
        seen = 0
        while seen < 90:
            try:
                batch = (await app.next("batch", timeout=1.0)).batch
            except TimeoutError:
                # Nothing more can come until something is settled: settle the oldest.
                assert held, "stalled with nothing held"
                app.ack(batch_ids=[held.pop(0).batch_id])
                continue
            held_partitions = {r.partition for b in held for r in b.records}
            for record in batch.records:
                assert record.partition not in held_partitions, "sent while unsettled"
                assert record.offset == next_offset[record.partition], "out of order"
                next_offset[record.partition] += 1
            seen += len(batch.records)
            held.append(batch)
        app.close()


async def test_second_stream_shares_the_subscription_within_its_own_window(
    new_topic: TopicFactory, producer: AIOKafkaProducer, start_sidecar: StartSidecar
) -> None:
    topic = await new_topic(partitions=4)
    await produce(producer, topic, 400, partitions=4)
    sub = group_subscription(
        "shared", topic, ordering="none", batch={"max_records": 10, "max_wait_ms": 50}
    )
    sidecar = await start_sidecar([sub], listener="plaintext")
    async with grpc.aio.insecure_channel(sidecar.address) as channel:
        first, second = AppStream(channel), AppStream(channel)
        await first.open("shared", max_outstanding_batches=1)
        await second.open("shared", max_outstanding_batches=2)
        a1 = (await first.next("batch")).batch
        b = [(await second.next("batch")).batch for _ in range(2)]
        # Each window is full: neither stream gets more until it settles.
        for stream in (first, second):
            with pytest.raises(TimeoutError):
                await stream.next("batch", timeout=2)
        first.ack(batch_ids=[a1.batch_id])
        a2 = (await first.next("batch")).batch
        seen = {(r.partition, r.offset) for x in (a1, a2, *b) for r in x.records}
        second.ack(batch_ids=[x.batch_id for x in b])
        first.ack(batch_ids=[a2.batch_id])

        async def drain(stream: AppStream) -> None:
            while True:
                try:
                    batch = (await stream.next("batch", timeout=3)).batch
                except TimeoutError:
                    return
                seen.update((r.partition, r.offset) for r in batch.records)
                stream.ack(batch_ids=[batch.batch_id])

        await asyncio.gather(drain(first), drain(second))
        assert len(seen) == 400
        first.close()
        second.close()


async def test_bad_input_gets_the_documented_status_and_others_keep_working(
    new_topic: TopicFactory, producer: AIOKafkaProducer, start_sidecar: StartSidecar
) -> None:
    topic = await new_topic(partitions=1)
    await produce(producer, topic, 50)
    sub = group_subscription("strict", topic, batch={"max_records": 10, "max_wait_ms": 50})
    token = uuid.uuid4().hex
    sidecar = await start_sidecar([sub], listener="plaintext", auth_token=token)
    good = [("authorization", f"Bearer {token}")]

    async def status_of(
        metadata: list[tuple[str, str]], *requests: pb.ConsumeRequest
    ) -> grpc.StatusCode:
        async with grpc.aio.insecure_channel(sidecar.address) as channel:
            app = AppStream(channel, metadata=metadata)
            for request in requests:
                app.send(request)
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await app.next("batch")
            code = failure.value.code()
            # Shown when an assertion on the code fails: what the server said.
            print(f"status_of: {code} {failure.value.details()!r}")
            return code

    opening = pb.ConsumeRequest(open=pb.Open(subscription="strict"))
    async with grpc.aio.insecure_channel(sidecar.address) as channel:
        # A healthy stream is open throughout; every failure below must leave it working.
        healthy = AppStream(channel, metadata=good)
        await healthy.open("strict", max_outstanding_batches=1)
        first = (await healthy.next("batch")).batch

        assert await status_of([], opening) == grpc.StatusCode.UNAUTHENTICATED
        assert (
            await status_of([("authorization", "Bearer nope")], opening)
            == grpc.StatusCode.UNAUTHENTICATED
        )
        assert (
            await status_of(good, pb.ConsumeRequest(ack=pb.Ack(batch_ids=[1])))
            == grpc.StatusCode.INVALID_ARGUMENT
        )
        assert await status_of(good, opening, opening) == grpc.StatusCode.INVALID_ARGUMENT
        assert (
            await status_of(good, pb.ConsumeRequest(open=pb.Open(subscription="nope")))
            == grpc.StatusCode.NOT_FOUND
        )

        healthy.ack(batch_ids=[999])
        rejected = (await healthy.next("rejected")).rejected
        assert list(rejected.batch_ids) == [999]
        assert rejected.reason == pb.REJECT_REASON_UNKNOWN

        healthy.ack(batch_ids=[first.batch_id])
        second = (await healthy.next("batch")).batch
        healthy.ack(batch_ids=[first.batch_id], records=[ref(first.records[0])])
        rejected = (await healthy.next("rejected")).rejected
        assert rejected.reason == pb.REJECT_REASON_ALREADY_SETTLED
        assert list(rejected.batch_ids) == [first.batch_id]
        assert [r.offset for r in rejected.records] == [first.records[0].offset]

        # Still serving: the stream goes on.
        healthy.ack(batch_ids=[second.batch_id])
        assert (await healthy.next("batch")).batch.records
        healthy.close()
