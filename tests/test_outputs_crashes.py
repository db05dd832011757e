"""Exactly-once outputs through crashes, rebalances and a fenced zombie, on the real broker
(issue: "an ack that carries output records, produced in one Kafka transaction with the
commit"). Real sidecar and app processes are killed with SIGKILL or stopped with SIGSTOP.

Every test ends the same way: the group's commits reach the end offsets, and a
`read_committed` reader of the output topic finds each input represented exactly once, while
the records themselves may have been delivered more than once (at-least-once delivery). Each
prints its figures on a `[figures]` line.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from aiokafka import AIOKafkaProducer

from kafkasidecar.v1 import consumer_pb2 as pb
from tests.localkafka import LocalKafka
from tests.sidecarproc import AppStream, SidecarProcess, group_subscription
from tests.test_crashes import FAST_GROUP, figures, wait_all_committed, wait_until
from tests.test_delivery import produce
from tests.test_outputs import read_outputs

TopicFactory = Callable[..., Awaitable[str]]
StartSidecar = Callable[..., Awaitable[SidecarProcess]]
Key = tuple[int, int]

TRANSACTIONS = {"enabled": True, "transactional_id_prefix": "eos-test"}


def eos_subscription(name: str, topic: str, **overrides: Any) -> dict[str, Any]:
    return group_subscription(
        name,
        topic,
        transactions=TRANSACTIONS,
        batch={"max_records": 50, "max_wait_ms": 50},
        consumer=FAST_GROUP,
        revoke_grace_ms=2000,
        **overrides,
    )


async def eos_setup(
    new_topic: TopicFactory, producer: AIOKafkaProducer, name: str, total: int, partitions: int
) -> tuple[str, str, set[Key], dict[str, Any]]:
    """An input topic with `total` records, an output topic, and the subscription."""
    topic = await new_topic(partitions=partitions)
    out = await new_topic(partitions=partitions)
    produced = set(await produce(producer, topic, total, partitions=partitions))
    return topic, out, produced, eos_subscription(name, topic)


def output_value(app: str, partition: int, offset: int) -> bytes:
    return f"{app}|{partition}:{offset}".encode()


def inputs_of(values: list[bytes]) -> Counter[Key]:
    """Which input each output names (`<app>|<partition>:<offset>`), counted."""
    counted: Counter[Key] = Counter()
    for value in values:
        partition, offset = value.decode().split("|")[1].split(":")
        counted[(int(partition), int(offset))] += 1
    return counted


async def transforming_app(
    app: AppStream, out: str, deliveries: Counter[Key], name: str, processing_s: float = 0.02
) -> None:
    """Acks each batch `processing_s` after it came with one output per record, until the
    stream ends (cleanly or because its sidecar went away)."""
    loop = asyncio.get_running_loop()
    ended = False

    def ack(batch: pb.Batch) -> None:
        if ended:
            return
        outputs = [
            pb.OutputRecord(topic=out, key=r.key, value=output_value(name, r.partition, r.offset))
            for r in batch.records
        ]
        app.send(pb.ConsumeRequest(ack=pb.Ack(batch_ids=[batch.batch_id], outputs=outputs)))

    while True:
        try:
            response = await app.next("batch", timeout=3600)
        except (grpc.aio.AioRpcError, AssertionError):
            ended = True
            return
        deliveries.update((r.partition, r.offset) for r in response.batch.records)
        loop.call_later(processing_s, ack, response.batch)


async def exactly_once(
    kafka: LocalKafka, group_id: str, topic: str, out: str, produced: set[Key]
) -> Counter[Key]:
    """The proof: commits at the end, every input's output visible exactly once."""
    await wait_all_committed(kafka, group_id, topic, timeout=120)
    outputs = inputs_of(await read_outputs(kafka, out))
    missing = produced - set(outputs)
    twice = {key: n for key, n in outputs.items() if n > 1}
    assert not missing, f"{len(missing)} inputs have no output, e.g. {sorted(missing)[:5]}"
    assert not twice, f"{len(twice)} inputs have several outputs, e.g. {sorted(twice)[:5]}"
    assert set(outputs) == produced
    return outputs


async def test_sidecar_killed_twice_mid_run_writes_every_output_exactly_once(
    kafka: LocalKafka,
    new_topic: TopicFactory,
    producer: AIOKafkaProducer,
    start_sidecar: StartSidecar,
) -> None:
    total = 5000
    topic, out, produced, sub = await eos_setup(new_topic, producer, "eos-kill", total, 4)
    deliveries: Counter[Key] = Counter()
    started = time.monotonic()
    for life in range(3):
        sidecar = await start_sidecar([sub], listener="plaintext")
        assert sidecar.proc is not None
        async with grpc.aio.insecure_channel(sidecar.address) as channel:
            app = AppStream(channel, keep=False)
            await app.open(sub["name"])
            running = asyncio.create_task(transforming_app(app, out, deliveries, f"life{life}"))
            if life < 2:
                # Killed with a share of the run behind it and transactions under way.
                goal = sum(deliveries.values()) + total // 4
                await wait_until(
                    lambda: sum(deliveries.values()) >= goal,  # noqa: B023
                    120,
                    lambda: f"no progress: {sum(deliveries.values())} deliveries",
                )
                sidecar.proc.kill()
                assert await asyncio.to_thread(sidecar.wait, 30) == -signal.SIGKILL
                await asyncio.wait_for(running, 30)
            else:
                try:
                    outputs = await exactly_once(kafka, sub["group_id"], topic, out, produced)
                finally:
                    app.close()
                    running.cancel()
    redelivered = sum(deliveries.values()) - len(deliveries)
    figures(
        "exactly-once, sidecar kill -9 twice",
        inputs=total,
        outputs_visible=sum(outputs.values()),
        duplicated_outputs=0,
        redelivered_records=redelivered,
        seconds=round(time.monotonic() - started),
    )


_TRANSFORMING_APP = """
import asyncio, sys

from kafkasidecar import Output, SidecarConsumer


async def main(target: str, subscription: str, out: str, name: str) -> None:
    # Acks each batch with one output per record, reporting each ack on stdout, until killed.
    async with SidecarConsumer(target, subscription) as consumer:
        async for batch in consumer:
            await asyncio.sleep(0.01)
            await batch.ack(
                outputs=[
                    Output(out, key=r.key, value=f"{name}|{r.partition}:{r.offset}".encode())
                    for r in batch
                ]
            )
            print(len(batch), flush=True)


asyncio.run(main(*sys.argv[1:]))
"""


async def test_app_killed_twice_mid_run_writes_every_output_exactly_once(
    kafka: LocalKafka,
    new_topic: TopicFactory,
    producer: AIOKafkaProducer,
    start_sidecar: StartSidecar,
    tmp_path: Path,
) -> None:
    total = 5000
    topic, out, produced, sub = await eos_setup(new_topic, producer, "eos-app", total, 4)
    sidecar = await start_sidecar([sub], listener="plaintext")
    script = tmp_path / "transforming_app.py"
    script.write_text(_TRANSFORMING_APP)
    acked_by_life = []
    for life in range(3):
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(script),
            sidecar.address,
            sub["name"],
            out,
            f"app{life}",
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            assert proc.stdout is not None
            acked = 0
            if life < 2:
                while acked < total // 4:
                    line = await asyncio.wait_for(proc.stdout.readline(), 60)
                    assert line, "the app exited"
                    acked += int(line)
                proc.kill()
                assert await asyncio.wait_for(proc.wait(), 30) == -signal.SIGKILL
            else:
                outputs = await exactly_once(kafka, sub["group_id"], topic, out, produced)
            acked_by_life.append(acked)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    figures(
        "exactly-once, app kill -9 twice",
        inputs=total,
        outputs_visible=sum(outputs.values()),
        duplicated_outputs=0,
        acked_before_kills=acked_by_life[:2],
    )


async def test_a_rebalance_between_two_sidecars_writes_every_output_exactly_once(
    kafka: LocalKafka,
    new_topic: TopicFactory,
    producer: AIOKafkaProducer,
    start_sidecar: StartSidecar,
) -> None:
    total, partitions = 5000, 4
    topic = await new_topic(partitions=partitions)
    out = await new_topic(partitions=partitions)
    sub = eos_subscription("eos-pair", topic)
    deliveries: Counter[Key] = Counter()
    produced: set[Key] = set()
    first = await start_sidecar([sub], listener="plaintext")
    async with contextlib.AsyncExitStack() as stack:
        tasks = []
        for n, sidecar in enumerate([first]):
            channel = await stack.enter_async_context(grpc.aio.insecure_channel(sidecar.address))
            app = AppStream(channel, keep=False)
            await app.open(sub["name"])
            tasks.append(asyncio.create_task(transforming_app(app, out, deliveries, f"s{n}")))
        produced |= set(await produce(producer, topic, total // 2, partitions=partitions))
        await wait_until(lambda: sum(deliveries.values()) >= total // 4, 120, lambda: "no progress")
        # A second member joins mid-run: partitions move while transactions are under way.
        second = await start_sidecar([sub], listener="plaintext")
        channel = await stack.enter_async_context(grpc.aio.insecure_channel(second.address))
        app2 = AppStream(channel, keep=False)
        await app2.open(sub["name"])
        tasks.append(asyncio.create_task(transforming_app(app2, out, deliveries, "s1")))
        produced |= set(await produce(producer, topic, total // 2, partitions=partitions))
        await wait_until(
            lambda: sum(deliveries.values()) >= total * 3 // 4, 120, lambda: "no progress"
        )
        # And the first one leaves (SIGTERM): they move back.
        first.signal(signal.SIGTERM)
        assert await asyncio.to_thread(first.wait, 60) == 0, first.logs()[-3000:]
        try:
            outputs = await exactly_once(kafka, sub["group_id"], topic, out, produced)
        finally:
            for task in tasks:
                task.cancel()
    by_app = Counter(value.split(b"|")[0].decode() for value in await read_outputs(kafka, out))
    figures(
        "exactly-once, rebalance between two sidecars",
        inputs=len(produced),
        outputs_visible=sum(outputs.values()),
        duplicated_outputs=0,
        redelivered_records=sum(deliveries.values()) - len(deliveries),
        outputs_by_app=dict(by_app),
    )
    assert set(by_app) == {"s0", "s1"}, "the partitions never moved"


async def test_a_fenced_zombie_makes_nothing_visible_after_losing_its_partitions(
    kafka: LocalKafka,
    new_topic: TopicFactory,
    producer: AIOKafkaProducer,
    start_sidecar: StartSidecar,
) -> None:
    """Sidecar A is stopped (SIGSTOP) past its session timeout with an ack carrying outputs
    on its way to it; B takes the partitions and processes everything; A resumes, reads the
    ack and tries to commit it: its producer is fenced, its outputs never become visible."""
    topic, out, produced, sub = await eos_setup(new_topic, producer, "eos-zombie", 400, 2)
    zombie = await start_sidecar([sub], listener="plaintext")
    assert zombie.proc is not None
    deliveries: Counter[Key] = Counter()
    async with grpc.aio.insecure_channel(zombie.address) as zombie_channel:
        zombie_app = AppStream(zombie_channel, keep=False)
        await zombie_app.open(sub["name"])
        stale = (await zombie_app.next("batch")).batch
        zombie.signal(signal.SIGSTOP)
        try:
            outputs = [
                pb.OutputRecord(topic=out, value=output_value("zombie", r.partition, r.offset))
                for r in stale.records
            ]
            zombie_app.send(
                pb.ConsumeRequest(ack=pb.Ack(batch_ids=[stale.batch_id], outputs=outputs))
            )
            healthy = await start_sidecar([sub], listener="plaintext")
            async with grpc.aio.insecure_channel(healthy.address) as channel:
                app = AppStream(channel, keep=False)
                await app.open(sub["name"])
                running = asyncio.create_task(transforming_app(app, out, deliveries, "healthy"))
                # B owns everything once A's session timed out, and processes it all.
                await wait_all_committed(kafka, sub["group_id"], topic, timeout=120)
                zombie.signal(signal.SIGCONT)
                await wait_until(
                    lambda: "fenced" in zombie.logs(),
                    60,
                    lambda: "the zombie never tried to commit: " + zombie.logs()[-2000:],
                )
                visible = await exactly_once(kafka, sub["group_id"], topic, out, produced)
                values = await read_outputs(kafka, out)
                app.close()
                running.cancel()
        finally:
            zombie.signal(signal.SIGCONT)
    from_zombie = [v for v in values if v.startswith(b"zombie|")]
    stale_keys = {(r.partition, r.offset) for r in stale.records}
    figures(
        "exactly-once, fenced zombie",
        inputs=len(produced),
        outputs_visible=sum(visible.values()),
        zombie_outputs_visible=len(from_zombie),
        stale_batch=len(stale_keys),
        stale_batch_redelivered_to_b=len(stale_keys & set(deliveries)),
    )
    assert not from_zombie
    assert stale_keys <= set(deliveries)
