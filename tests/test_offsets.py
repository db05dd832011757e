"""ResetOffsets (live and offline) and GetStatus, through the CLI and the RPC, checked against
Kafka's own view of the group."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Awaitable, Callable

import grpc
from aiokafka import AIOKafkaProducer

from kafkasidecar.v1 import consumer_pb2 as pb
from kafkasidecar.v1 import consumer_pb2_grpc as pb_grpc
from tests.localkafka import LocalKafka, committed_offsets, end_offsets
from tests.sidecarproc import BIN, AppStream, SidecarProcess, group_subscription
from tests.test_delivery import produce, wait_committed

TopicFactory = Callable[..., Awaitable[str]]
StartSidecar = Callable[..., Awaitable[SidecarProcess]]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "kafka-sidecar"), *args], capture_output=True, text=True, timeout=120
    )


async def consume_all(app: AppStream, count: int) -> list[pb.Record]:
    records: list[pb.Record] = []
    while len(records) < count:
        batch = (await app.next("batch")).batch
        records.extend(batch.records)
        app.ack(batch_ids=[batch.batch_id])
    return records


async def test_reset_to_earliest_replays_and_dry_run_changes_nothing(
    kafka: LocalKafka,
    new_topic: TopicFactory,
    producer: AIOKafkaProducer,
    start_sidecar: StartSidecar,
) -> None:
    topic = await new_topic(partitions=2)
    await produce(producer, topic, 40, partitions=2)
    sub = group_subscription("replay", topic, batch={"max_records": 10, "max_wait_ms": 50})
    sidecar = await start_sidecar([sub], listener="plaintext")
    async with grpc.aio.insecure_channel(sidecar.address) as channel:
        app = AppStream(channel)
        await app.open("replay")
        await consume_all(app, 40)
        await wait_committed(kafka, sub["group_id"], topic)

        dry = await asyncio.to_thread(
            cli, "reset-offsets", "--target", sidecar.address, "--subscription", "replay",
            "--to-earliest", "--dry-run",
        )  # fmt: skip
        assert dry.returncode == 0, dry.stderr
        assert "dry run" in dry.stdout
        assert f"{topic}" in dry.stdout
        assert await committed_offsets(kafka, sub["group_id"]) == await end_offsets(kafka, topic)

        done = await asyncio.to_thread(
            cli, "reset-offsets", "--target", sidecar.address, "--subscription", "replay",
            "--to-earliest",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert await committed_offsets(kafka, sub["group_id"]) == {(topic, 0): 0, (topic, 1): 0}
        again = await consume_all(app, 40)
        assert sorted((r.partition, r.offset) for r in again) == sorted(
            (p, o) for p in (0, 1) for o in range(20)
        )
        await wait_committed(kafka, sub["group_id"], topic)
        app.close()


async def test_reset_to_timestamp_and_to_explicit_offsets_and_late_acks(
    kafka: LocalKafka,
    new_topic: TopicFactory,
    producer: AIOKafkaProducer,
    start_sidecar: StartSidecar,
) -> None:
    topic = await new_topic(partitions=1)
    base = 1_700_000_000_000
    for i in range(10):
        await producer.send_and_wait(topic, f"v{i}".encode(), timestamp_ms=base + i * 1000)
    sub = group_subscription("seek", topic, batch={"max_records": 10, "max_wait_ms": 50})
    sidecar = await start_sidecar([sub], listener="plaintext")
    async with grpc.aio.insecure_channel(sidecar.address) as channel:
        stub = pb_grpc.ConsumerServiceStub(channel)
        app = AppStream(channel)
        await app.open("seek")
        held = (await app.next("batch")).batch
        assert len(held.records) == 10

        response = await stub.ResetOffsets(
            pb.ResetOffsetsRequest(
                subscription="seek",
                target=pb.RESET_TARGET_TIMESTAMP,
                timestamp_ms=base + 5000 - 1,
            )
        )
        assert [(c.partition, c.old_offset, c.new_offset) for c in response.changes] == [(0, -1, 5)]
        assert await committed_offsets(kafka, sub["group_id"]) == {(topic, 0): 5}
        # What was in flight before the reset is void.
        app.ack(batch_ids=[held.batch_id])
        assert (await app.next("rejected")).rejected.reason == pb.REJECT_REASON_REVOKED
        after = (await app.next("batch")).batch
        assert [r.offset for r in after.records] == [5, 6, 7, 8, 9]
        app.ack(batch_ids=[after.batch_id])

        done = await asyncio.to_thread(
            cli, "reset-offsets", "--target", sidecar.address, "--subscription", "seek",
            "--to-offset", f"{topic}:0=3",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert await committed_offsets(kafka, sub["group_id"]) == {(topic, 0): 3}
        after = (await app.next("batch")).batch
        assert after.records[0].offset == 3

        bad = await asyncio.to_thread(
            cli, "reset-offsets", "--target", sidecar.address, "--subscription", "seek",
            "--to-offset", f"{topic}:0=99",
        )  # fmt: skip
        assert bad.returncode == 1
        assert "outside the log" in bad.stderr
        app.close()


async def test_offline_reset_refuses_a_live_group_then_resets_a_stopped_one(
    kafka: LocalKafka,
    new_topic: TopicFactory,
    producer: AIOKafkaProducer,
    start_sidecar: StartSidecar,
) -> None:
    topic = await new_topic(partitions=2)
    await produce(producer, topic, 20, partitions=2)
    sub = group_subscription("offline", topic, batch={"max_records": 10, "max_wait_ms": 50})
    sidecar = await start_sidecar([sub], listener="plaintext")
    async with grpc.aio.insecure_channel(sidecar.address) as channel:
        app = AppStream(channel)
        await app.open("offline")
        await consume_all(app, 20)
        await wait_committed(kafka, sub["group_id"], topic)
        app.close()

    args = ["reset-offsets", "--config", str(sidecar.config_path), "--group", sub["group_id"]]
    refused = await asyncio.to_thread(cli, *args, "--to-earliest")
    assert refused.returncode == 1
    assert "not empty" in refused.stderr
    assert await committed_offsets(kafka, sub["group_id"]) == {(topic, 0): 10, (topic, 1): 10}

    sidecar.stop()
    dry = await asyncio.to_thread(cli, *args, "--to-earliest", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "dry run" in dry.stdout
    assert await committed_offsets(kafka, sub["group_id"]) == {(topic, 0): 10, (topic, 1): 10}
    done = await asyncio.to_thread(cli, *args, "--to-earliest")
    assert done.returncode == 0, done.stderr
    assert await committed_offsets(kafka, sub["group_id"]) == {(topic, 0): 0, (topic, 1): 0}


async def test_status_figures_equal_kafkas_own(
    kafka: LocalKafka,
    new_topic: TopicFactory,
    producer: AIOKafkaProducer,
    start_sidecar: StartSidecar,
) -> None:
    topic, compacted = await new_topic(partitions=3), await new_topic()
    await produce(producer, topic, 30, partitions=3)
    sub = group_subscription("watched", topic, batch={"max_records": 10, "max_wait_ms": 50})
    snapshot = {"name": "brands", "topics": [compacted], "mode": "snapshot"}
    sidecar = await start_sidecar([sub, snapshot], listener="plaintext")
    async with grpc.aio.insecure_channel(sidecar.address) as channel:
        app = AppStream(channel)
        await app.open("watched", max_outstanding_batches=2)
        held = (await app.next("batch")).batch  # stays in flight
        assert await consume_all(app, 10)  # settled
        extra = (await app.next("batch")).batch  # fills the window of 2: nothing more comes
        brands = AppStream(channel)
        await brands.open("brands")
        await brands.next("caught_up")
        await asyncio.sleep(1)  # a commit interval

        shown = await asyncio.to_thread(cli, "status", "--target", sidecar.address, "--json")
        assert shown.returncode == 0, shown.stderr
        status = json.loads(shown.stdout)
        text = await asyncio.to_thread(cli, "status", "--target", sidecar.address)
        assert "watched (group" in text.stdout
        assert "caught up: yes" in text.stdout

        committed = await committed_offsets(kafka, sub["group_id"])
        ends = await end_offsets(kafka, topic)
        (watched,) = [s for s in status["subscriptions"] if s["name"] == "watched"]
        assert watched["streams"] == 1
        assert watched["in_flight_records"] == len(held.records) + len(extra.records)
        for partition in watched["partitions"]:
            tp = (partition["topic"], partition["partition"])
            assert int(partition["committed_offset"]) == committed.get(tp, -1)
            assert int(partition["high_watermark"]) == ends[tp]
            base = committed.get(tp, int(partition["position"]))
            assert int(partition.get("lag", 0)) == ends[tp] - base
        assert {p["partition"] for p in watched["partitions"]} == {0, 1, 2}
        (snap,) = [s for s in status["subscriptions"] if s["name"] == "brands"]
        assert snap["caught_up"] is True
        app.close()
        brands.close()


async def test_live_reset_touches_only_owned_partitions_and_reports_the_rest(
    kafka: LocalKafka,
    new_topic: TopicFactory,
    producer: AIOKafkaProducer,
    start_sidecar: StartSidecar,
) -> None:
    topic = await new_topic(partitions=4)
    await produce(producer, topic, 40, partitions=4)
    sub = group_subscription("shared", topic, batch={"max_records": 10, "max_wait_ms": 50})
    first = await start_sidecar([sub], listener="plaintext")
    second = await start_sidecar([sub], listener="plaintext")
    async with grpc.aio.insecure_channel(first.address) as channel:
        stub = pb_grpc.ConsumerServiceStub(channel)
        async with asyncio.timeout(60):
            while True:  # until the rebalance gave each member its share
                status = await stub.GetStatus(pb.GetStatusRequest(subscription="shared"))
                owned = {(p.topic, p.partition) for p in status.subscriptions[0].partitions}
                if len(owned) == 2:
                    break
                await asyncio.sleep(0.5)
        response = await stub.ResetOffsets(
            pb.ResetOffsetsRequest(subscription="shared", target=pb.RESET_TARGET_LATEST)
        )
    assert {(c.topic, c.partition) for c in response.changes} == owned
    assert {c.new_offset for c in response.changes} == {10}
    assert {(p.topic, p.partition) for p in response.not_owned} == {
        (topic, p) for p in range(4)
    } - owned
    committed = await committed_offsets(kafka, sub["group_id"])
    assert {tp for tp, offset in committed.items() if offset == 10} == owned
    assert second.proc is not None
    assert second.proc.poll() is None, "the other member was not disturbed"
