"""Stall detection: the pure tracker (sidecar/stalls.py), and a real sidecar with a stuck
record showing it in its gauge, its log and its status."""

from __future__ import annotations

import asyncio
import json

from kafkasidecar.v1 import consumer_pb2 as pb
from sidecar.stalls import Stall, Stalls
from tests.harness import consuming
from tests.localkafka import LocalKafka
from tests.sidecarproc import ref
from tests.test_metrics import scrape
from tests.test_offsets import cli
from tests.test_server import free_port

TP = ("t", 0)


def test_a_commit_standing_still_while_records_are_owed_is_a_stall_once() -> None:
    stalls = Stalls(after_s=10)
    assert stalls.check(TP, 5, owed=True, now=0) is None
    assert stalls.check(TP, 5, owed=True, now=9.9) is None
    assert stalls.check(TP, 5, owed=True, now=10) == Stall(5, 0)
    assert stalls.check(TP, 5, owed=True, now=11) is None  # reported once
    assert TP in stalls.stalled
    assert stalls.check(TP, 6, owed=True, now=12) is None  # it moved
    assert not stalls.stalled
    assert stalls.check(TP, 6, owed=True, now=22) == Stall(6, 12)


def test_nothing_owed_is_never_a_stall_and_ownership_ends_it() -> None:
    stalls = Stalls(after_s=10)
    for now in range(0, 100, 5):
        assert stalls.check(TP, 5, owed=False, now=now) is None  # an idle partition
    assert stalls.check(TP, 5, owed=True, now=100) is None  # owed from now on
    assert stalls.check(TP, 5, owed=True, now=110) == Stall(5, 100)
    stalls.keep(set())
    assert not stalls.stalled


async def test_a_stuck_record_shows_as_a_stall_in_gauge_log_and_status(kafka: LocalKafka) -> None:
    metrics = f"127.0.0.1:{free_port()}"
    async with consuming(
        kafka,
        "stuck",
        records=10,
        stall_after_ms=1000,
        sidecar_options={"metrics": metrics},
    ) as c:
        records = await c.receive(10, ack=False)
        c.app.ack(records=[ref(r) for r in records if r.offset != 3])
        gauge = (
            "kafka_sidecar_partition_stalled",
            (("partition", "0"), ("subscription", c.name), ("topic", c.topic)),
        )
        async with asyncio.timeout(60):
            while (await scrape(metrics)).get(gauge) != 1:
                await asyncio.sleep(0.2)
        lines = [json.loads(line) for line in c.sidecar.logs().splitlines() if "stalled" in line]
        (line,) = [entry for entry in lines if entry.get("msg", "").startswith("partition stalled")]
        assert (line["topic"], line["partition"], line["offset"]) == (c.topic, 0, 3)
        assert line["record"].startswith("out with stream ")
        status = await c.stub.GetStatus(pb.GetStatusRequest(subscription=c.name))
        (partition,) = status.subscriptions[0].partitions
        assert "offset 3" in partition.stalled
        assert "out with stream" in partition.stalled
        shown = await asyncio.to_thread(cli, "status", "--target", c.sidecar.address)
        assert f"STALLED {c.topic}[0]: commit at offset 3" in shown.stdout

        c.app.ack(records=[ref(r) for r in records if r.offset == 3])
        await c.wait_committed()
        async with asyncio.timeout(60):
            while (await scrape(metrics)).get(gauge) != 0:
                await asyncio.sleep(0.2)
        status = await c.stub.GetStatus(pb.GetStatusRequest(subscription=c.name))
        assert status.subscriptions[0].partitions[0].stalled == ""
