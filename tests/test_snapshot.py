"""`mode: snapshot`: full replay of a compacted topic per stream, `caught_up`, then live."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import grpc
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewPartitions

from kafkasidecar.v1 import consumer_pb2 as pb
from tests.localkafka import LocalKafka
from tests.sidecarproc import AppStream, SidecarProcess
from tests.test_metrics import scrape
from tests.test_server import free_port

TopicFactory = Callable[..., Awaitable[str]]
StartSidecar = Callable[..., Awaitable[SidecarProcess]]


def snapshot_subscription(name: str, topic: str) -> dict[str, object]:
    return {
        "name": name,
        "topics": [topic],
        "mode": "snapshot",
        "batch": {"max_records": 200, "max_wait_ms": 50},
    }


async def read_until_caught_up(app: AppStream, state: dict[bytes, bytes]) -> pb.CaughtUp:
    """Applies batches to `state` (tombstones delete) and acks them, up to `caught_up`."""
    while True:
        response = await app.next()
        kind = response.WhichOneof("kind")
        if kind == "batch":
            apply(response.batch, state)
            app.ack(batch_ids=[response.batch.batch_id])
        elif kind == "caught_up":
            return response.caught_up


def apply(batch: pb.Batch, state: dict[bytes, bytes]) -> None:
    for record in batch.records:
        if record.HasField("value"):
            state[record.key] = record.value
        else:
            state.pop(record.key, None)


async def test_compacted_topic_snapshot_then_live_then_full_replay(
    new_topic: TopicFactory, producer: AIOKafkaProducer, start_sidecar: StartSidecar
) -> None:
    topic = await new_topic(partitions=3, config={"cleanup.policy": "compact", "segment.ms": "100"})
    expected: dict[bytes, bytes] = {}
    for version in range(3):
        for k in range(1000):
            key, value = f"brand-{k}".encode(), f"v{version}-{k}".encode()
            await producer.send(topic, value, key=key)
            expected[key] = value
    for k in range(0, 1000, 10):
        key = f"brand-{k}".encode()
        await producer.send(topic, None, key=key)  # tombstone
        del expected[key]
    await producer.flush()

    sidecar = await start_sidecar([snapshot_subscription("brands", topic)], listener="plaintext")
    async with grpc.aio.insecure_channel(sidecar.address) as channel:
        app = AppStream(channel, keep=False)
        opened = await app.open("brands")
        assert opened.mode == pb.SUBSCRIPTION_MODE_SNAPSHOT
        state: dict[bytes, bytes] = {}
        caught_up = await read_until_caught_up(app, state)
        assert state == expected
        assert len(caught_up.end_offsets) == 3

        # Live updates follow.
        await producer.send_and_wait(topic, b"renamed", key=b"brand-1")
        await producer.send_and_wait(topic, None, key=b"brand-2")
        expected[b"brand-1"] = b"renamed"
        del expected[b"brand-2"]
        async with asyncio.timeout(60):
            while state != expected:
                batch = (await app.next("batch")).batch
                apply(batch, state)
                app.ack(batch_ids=[batch.batch_id])
        app.close()

        # A new stream reads everything again, from the beginning.
        again = AppStream(channel, keep=False)
        await again.open("brands")
        replay: dict[bytes, bytes] = {}
        await read_until_caught_up(again, replay)
        assert replay == expected
        again.close()


async def test_caught_up_on_an_empty_topic(
    new_topic: TopicFactory, start_sidecar: StartSidecar
) -> None:
    topic = await new_topic(partitions=2)
    sidecar = await start_sidecar([snapshot_subscription("empty", topic)], listener="plaintext")
    async with grpc.aio.insecure_channel(sidecar.address) as channel:
        app = AppStream(channel)
        await app.open("empty")
        caught_up = (await app.next("caught_up")).caught_up
        assert {(e.partition, e.offset) for e in caught_up.end_offsets} == {(0, 0), (1, 0)}
        assert not [r for r in app.received if r.WhichOneof("kind") == "batch"]
        app.close()


async def test_caught_up_when_the_tail_is_a_transaction_marker(
    kafka: LocalKafka, new_topic: TopicFactory, start_sidecar: StartSidecar
) -> None:
    topic = await new_topic(partitions=1)
    producer = AIOKafkaProducer(
        bootstrap_servers=kafka.plaintext, transactional_id=f"tx-{topic}", enable_idempotence=True
    )
    await producer.start()
    try:
        async with producer.transaction():
            for i in range(3):
                await producer.send(topic, f"v{i}".encode(), key=f"k{i}".encode())
    finally:
        await producer.stop()

    sidecar = await start_sidecar([snapshot_subscription("tx", topic)], listener="plaintext")
    async with grpc.aio.insecure_channel(sidecar.address) as channel:
        app = AppStream(channel)
        await app.open("tx")
        state: dict[bytes, bytes] = {}
        caught_up = await read_until_caught_up(app, state)
        # Three records and the commit marker: the end offset is past the last record.
        assert [(e.partition, e.offset) for e in caught_up.end_offsets] == [(0, 4)]
        assert state == {b"k0": b"v0", b"k1": b"v1", b"k2": b"v2"}
        app.close()


async def test_partitions_added_later_are_read_from_their_start(
    kafka: LocalKafka,
    new_topic: TopicFactory,
    producer: AIOKafkaProducer,
    start_sidecar: StartSidecar,
) -> None:
    topic = await new_topic(partitions=1)
    await producer.send_and_wait(topic, b"a", key=b"a")
    sidecar = await start_sidecar([snapshot_subscription("grow", topic)], listener="plaintext")
    async with grpc.aio.insecure_channel(sidecar.address) as channel:
        app = AppStream(channel)
        await app.open("grow")
        state: dict[bytes, bytes] = {}
        await read_until_caught_up(app, state)
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka.plaintext)
        await admin.start()
        try:
            await admin.create_partitions({topic: NewPartitions(total_count=2)})
        finally:
            await admin.close()
        await producer.client.force_metadata_update()
        await producer.send_and_wait(topic, b"b", key=b"b", partition=1)
        async with asyncio.timeout(60):
            while b"b" not in state:
                batch = (await app.next("batch")).batch
                apply(batch, state)
                app.ack(batch_ids=[batch.batch_id])
        assert state == {b"a": b"a", b"b": b"b"}
        app.close()


async def test_overlapping_streams_each_get_their_own_read(
    new_topic: TopicFactory, producer: AIOKafkaProducer, start_sidecar: StartSidecar
) -> None:
    """A stream closing must end only its own read, whatever the others do meanwhile."""
    topic = await new_topic(partitions=2)
    for k in range(20):
        await producer.send(topic, f"v{k}".encode(), key=f"k{k}".encode())
    await producer.flush()
    sidecar = await start_sidecar([snapshot_subscription("both", topic)], listener="plaintext")
    async with grpc.aio.insecure_channel(sidecar.address) as channel:
        first, second = AppStream(channel), AppStream(channel)
        opened_first = await first.open("both")
        first_state: dict[bytes, bytes] = {}
        await read_until_caught_up(first, first_state)
        opened_second = await second.open("both")
        assert opened_first.stream_id != opened_second.stream_id
        first.close()  # while the second read is going on
        second_state: dict[bytes, bytes] = {}
        await read_until_caught_up(second, second_state)
        assert second_state == first_state
        assert len(second_state) == 20
        second.close()


async def test_a_partition_added_while_the_app_stalls_keeps_the_backlog_bounded(
    kafka: LocalKafka,
    new_topic: TopicFactory,
    producer: AIOKafkaProducer,
    start_sidecar: StartSidecar,
) -> None:
    """Picking up a new partition re-assigns the reader's consumer, which resets aiokafka's
    pause state: the stalled partition must be paused again, not fetched to its end."""
    topic = await new_topic(partitions=1)
    for i in range(20_000):
        await producer.send(topic, b"x" * 100, key=b"%d" % i, partition=0)
    await producer.flush()
    address = f"127.0.0.1:{free_port()}"
    sub = snapshot_subscription("stall", topic)
    # Small fetches, so that "paused" and "read to the end" are far apart in records: each
    # poll hands over whole fetches, and pausing takes effect from the next one.
    sub["consumer"] = {"max_partition_fetch_bytes": 16_384}
    sub["batch"] = {"max_records": 200, "max_bytes": 16_384, "max_wait_ms": 50}
    sidecar = await start_sidecar([sub], listener="plaintext", metrics=address)
    async with grpc.aio.insecure_channel(sidecar.address) as channel:
        app = AppStream(channel)
        await app.open("stall", max_outstanding_batches=1)
        await app.next("batch")  # and never acked: the app stalls
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka.plaintext)
        await admin.start()
        try:
            await admin.create_partitions({topic: NewPartitions(total_count=2)})
        finally:
            await admin.close()
        async with asyncio.timeout(60):
            while f'["{topic}", 1]' not in sidecar.logs():  # the reader took partition 1
                await asyncio.sleep(0.2)
        buffered = []
        for _ in range(10):
            await asyncio.sleep(0.3)
            samples = await scrape(address)
            buffered.append(
                samples[("kafka_sidecar_buffered_records", (("subscription", "stall"),))]
            )
        # Paused at two fetches' worth (~290 records) plus a fetch or two, not 20,000.
        assert max(buffered) < 2_000, buffered
        app.close()
