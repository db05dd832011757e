"""The delivery core end to end: real broker, real `kafka-sidecar run` process, real gRPC."""

from __future__ import annotations

import asyncio
import random
import uuid

import grpc
import psutil
import pytest
from aiokafka import AIOKafkaProducer

from kafkasidecar.v1 import consumer_pb2 as pb
from tests.harness import Consuming, consuming, stream_error

# test_crashes, test_failures, test_metrics and test_offsets import these two from here.
from tests.harness import produce as produce
from tests.harness import wait_committed as wait_committed
from tests.localkafka import LocalKafka, describe_group
from tests.sidecarproc import AppStream, aws_env, ref


async def test_records_reach_the_app_over_iam_and_shuffled_acks_commit_everything(
    kafka: LocalKafka,
) -> None:
    received: dict[tuple[int, int], bytes] = {}
    rng = random.Random(7)
    async with consuming(
        kafka,
        "receipts",
        partitions=4,
        records=10_000,
        listener="iam",
        batch={"max_records": 250},
        window={"max_outstanding_batches": 8, "max_outstanding_records": 4000},
    ) as c:
        app, produced = c.app, c.produced
        assert c.opened.group_id == c.group_id
        assert c.opened.mode == pb.SUBSCRIPTION_MODE_GROUP
        held: list[pb.Batch] = []
        while len(received) < len(produced):
            batch = await c.batch()
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
        await c.wait_committed()
    assert received == produced


@pytest.mark.parametrize("transcoder", ["native", "pure"])
async def test_batches_respect_limits_and_records_arrive_intact(
    kafka: LocalKafka, transcoder: str
) -> None:
    """Both transcoder implementations, end to end (`KAFKA_SIDECAR_TRANSCODER=pure` is the
    path of platforms without the compiled one)."""
    sent: list[tuple[bytes | None, bytes | None, list[tuple[str, bytes | None]]]] = [
        (b"k-plain", b"v" * 300, [("h", b"1")]),
        (None, b"null key", []),
        (b"tombstone", None, [("a", b"x"), ("a", b"y"), ("a", b"x")]),
        (b"null-header", b"v", [("n", None), ("e", b"")]),
        (b"", b"", []),
    ]
    sent += [(f"k{i}".encode(), bytes([i % 256]) * 300, []) for i in range(30)]

    async def produce_sent(c: Consuming) -> None:
        for key, value, headers in sent:
            await c.producer.send_and_wait(c.topic, value, key=key, headers=headers)

    async with consuming(
        kafka,
        "limits",
        prepare=produce_sent,
        batch={"max_records": 7, "max_bytes": 2000, "max_wait_ms": 300},
        sidecar_options={"env": {**aws_env(kafka), "KAFKA_SIDECAR_TRANSCODER": transcoder}},
    ) as c:
        assert f'"transcoder": "{transcoder}"' in c.sidecar.logs()
        records: list[pb.Record] = []
        while len(records) < len(sent):
            batch = await c.batch()
            sizes = [
                len(r.key) + len(r.value) + sum(len(h.key) + len(h.value) for h in r.headers)
                for r in batch.records
            ]
            assert 1 <= len(batch.records) <= 7
            assert sum(sizes) <= 2000 or len(batch.records) == 1
            records.extend(batch.records)
            c.ack(batch)

        for record, (key, value, headers) in zip(records, sent, strict=True):
            assert (record.topic, record.partition) == (c.topic, 0)
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
            await c.producer.send_and_wait(c.topic, b"late", key=f"late{i}".encode())
        batch = await c.batch()
        assert [r.key for r in batch.records] == [b"late0", b"late1", b"late2"]
        c.ack(batch)
        await c.wait_committed()


async def test_flow_control_window_holds_and_a_stalled_app_keeps_the_group(
    kafka: LocalKafka,
) -> None:
    async with consuming(
        kafka,
        "slow",
        partitions=2,
        records=1000,
        size=1024,
        batch={"max_records": 50, "max_wait_ms": 100},
        consumer={
            "max_poll_interval_ms": 5000,
            "session_timeout_ms": 6000,
            "heartbeat_interval_ms": 1000,
        },
        max_outstanding_batches=2,
    ) as c:
        assert c.sidecar.proc is not None
        process = psutil.Process(c.sidecar.proc.pid)
        assert c.opened.max_outstanding_batches == 2
        first = [await c.batch() for _ in range(2)]
        rss_before = process.memory_info().rss
        state, members = await describe_group(kafka, c.group_id)
        assert (state, len(members)) == ("Stable", 1)

        # A 100k-record backlog (100 MiB) builds up while the app sits on its two batches
        # for more than twice max_poll_interval_ms.
        await c.produce(100_000, size=1024)
        with pytest.raises(TimeoutError):
            await c.batch(timeout=12)
        growth = process.memory_info().rss - rss_before
        assert growth < 64 * 1024 * 1024, f"RSS grew {growth / 2**20:.0f} MiB with the backlog"
        assert not [r for r in c.app.received if r.WhichOneof("kind") == "partitions_revoked"]
        assert "partitions revoked" not in c.sidecar.logs()

        # Same member, never kicked out: no rebalance happened.
        assert await describe_group(kafka, c.group_id) == ("Stable", members)

        # Settling opens the window again.
        c.ack(*first)
        more = await c.batch()
        assert more.records


async def test_partition_ordering_holds_a_partition_until_it_is_settled(kafka: LocalKafka) -> None:
    async with consuming(
        kafka,
        "ordered",
        partitions=3,
        records=90,
        batch={"max_records": 5, "max_wait_ms": 50},
        max_outstanding_batches=10,
    ) as c:
        held: list[pb.Batch] = []
        next_offset = {0: 0, 1: 0, 2: 0}
        seen = 0
        while seen < 90:
            try:
                batch = await c.batch(timeout=1.0)
            except TimeoutError:
                # Nothing more can come until something is settled: settle the oldest.
                assert held, "stalled with nothing held"
                c.ack(held.pop(0))
                continue
            held_partitions = {r.partition for b in held for r in b.records}
            for record in batch.records:
                assert record.partition not in held_partitions, "sent while unsettled"
                assert record.offset == next_offset[record.partition], "out of order"
                next_offset[record.partition] += 1
            seen += len(batch.records)
            held.append(batch)


async def test_second_stream_shares_the_subscription_within_its_own_window(
    kafka: LocalKafka,
) -> None:
    async with consuming(
        kafka,
        "shared",
        partitions=4,
        records=400,
        ordering="none",
        batch={"max_records": 10, "max_wait_ms": 50},
        max_outstanding_batches=1,
    ) as c:
        first = c.app
        second = await c.open_stream(max_outstanding_batches=2)
        a1 = await c.batch(first)
        b = [await c.batch(second) for _ in range(2)]
        # Each window is full: neither stream gets more until it settles.
        for stream in (first, second):
            with pytest.raises(TimeoutError):
                await stream.next("batch", timeout=2)
        first.ack(batch_ids=[a1.batch_id])
        a2 = await c.batch(first)
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


async def test_bad_input_gets_the_documented_status_and_others_keep_working(
    kafka: LocalKafka,
) -> None:
    token = uuid.uuid4().hex
    # A healthy stream is open throughout; every failure below must leave it working.
    async with consuming(
        kafka,
        "strict",
        records=50,
        batch={"max_records": 10, "max_wait_ms": 50},
        auth_token=token,
        max_outstanding_batches=1,
    ) as c:
        good = c.metadata

        async def status_of(
            metadata: list[tuple[str, str]], *requests: pb.ConsumeRequest
        ) -> grpc.StatusCode:
            failure = await stream_error(c.sidecar.address, *requests, metadata=metadata)
            return failure.code()

        opening = pb.ConsumeRequest(open=pb.Open(subscription="strict"))
        healthy = c.app
        first = await c.batch()

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


@pytest.mark.parametrize("transcoder", ["native", "pure"])
@pytest.mark.parametrize("codec", ["gzip", "snappy", "lz4", "zstd"])
async def test_compressed_topics_are_delivered_intact(
    kafka: LocalKafka, codec: str, transcoder: str
) -> None:
    """MSK producers compress: every codec Kafka has must reach the app, not stop the fetch."""
    sent: dict[bytes, bytes] = {}

    async def produce_compressed(c: Consuming) -> None:
        producer = AIOKafkaProducer(bootstrap_servers=kafka.plaintext, compression_type=codec)
        await producer.start()
        try:
            for i in range(300):
                key, value = b"k%d" % i, (b"%d-" % i) * (i % 50 + 1)
                sent[key] = value
                await producer.send(c.topic, value, key=key, partition=i % 2)
            await producer.flush()
        finally:
            await producer.stop()

    async with consuming(
        kafka,
        f"zip-{codec}",
        partitions=2,
        prepare=produce_compressed,
        sidecar_options={"env": {**aws_env(kafka), "KAFKA_SIDECAR_TRANSCODER": transcoder}},
    ) as c:
        records = await c.receive(300)
        assert {r.key: r.value for r in records} == sent
        await c.wait_committed()
