"""The three-broker bed itself (`scripts/local-kafka start --brokers 3`): MSK's defaults, every
listener on every broker, and broker faults that keep acks=all writes going (min ISR 2)."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Awaitable, Callable

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from tests.chaos import Cluster, broker_command
from tests.localkafka import SCRIPT, LocalKafka

pytestmark = pytest.mark.cluster

TopicFactory = Callable[..., Awaitable[str]]


async def test_three_brokers_with_msk_defaults(kafka: LocalKafka, new_topic: TopicFactory) -> None:
    assert kafka.brokers == 3
    assert [len(kafka.plaintext.split(",")), len(kafka.iam.split(","))] == [3, 3]
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.plaintext)
    await admin.start()
    try:
        topic = await new_topic(partitions=3)
        # A topic made without a replication factor gets the bed's default, as on MSK.
        (config,) = await admin.describe_configs([ConfigResource(ConfigResourceType.BROKER, "0")])
        broker = {entry[0]: entry[1] for entry in config.resources[0][4]}
        assert broker["default.replication.factor"] == "3"
        assert broker["min.insync.replicas"] == "2"
        assert broker["offsets.topic.replication.factor"] == "3"
        assert broker["transaction.state.log.replication.factor"] == "3"
    finally:
        await admin.close()
    partitions = await Cluster(kafka).partitions([topic])
    assert {len(p["replicas"]) for p in partitions} == {3}
    assert {p["leader"] for p in partitions} == {0, 1, 2}  # leaders spread over the brokers


@pytest.mark.parametrize("listener", ["plaintext", "ssl", "scram", "iam"])
async def test_each_broker_serves_every_listener(
    kafka: LocalKafka, new_topic: TopicFactory, listener: str
) -> None:
    """Each broker alone, as the only bootstrap address, on each of its listeners."""
    topic = await new_topic(partitions=3)
    for address in kafka.client_kwargs(listener)["bootstrap_servers"].split(","):
        producer = AIOKafkaProducer(**kafka.client_kwargs(listener, bootstrap_servers=address))
        await producer.start()
        try:
            await producer.send_and_wait(topic, address.encode())
            assert len(producer.client.cluster.brokers()) == 3
        finally:
            await producer.stop()


async def test_writes_go_on_while_one_broker_is_killed(
    kafka: LocalKafka, new_topic: TopicFactory
) -> None:
    """kill-broker leaves two replicas of three: acks=all writes go on (min ISR 2); start-broker
    brings it back and every replica catches up; restart-broker is a controlled shutdown."""
    topic = await new_topic(partitions=3)
    cluster = Cluster(kafka)
    producer = AIOKafkaProducer(bootstrap_servers=kafka.plaintext, acks="all")
    await producer.start()
    try:
        await broker_command("kill", 1)
        status = await asyncio.to_thread(
            subprocess.run, [str(SCRIPT), "status"], capture_output=True, text=True
        )
        assert status.returncode == 3
        assert "broker 1 not running" in status.stdout
        for i in range(30):
            await producer.send_and_wait(topic, b"%d" % i, partition=i % 3)
        await broker_command("start", 1)
        await cluster.wait_in_sync([topic])
        await broker_command("restart", 2)
        await cluster.wait_in_sync([topic])
        for i in range(30, 60):
            await producer.send_and_wait(topic, b"%d" % i, partition=i % 3)
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=kafka.plaintext, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        seen: set[bytes] = set()
        async with asyncio.timeout(60):
            while len(seen) < 60:
                for records in (await consumer.getmany(timeout_ms=1000)).values():
                    seen.update(r.value for r in records if r.value is not None)
    finally:
        await consumer.stop()
    assert seen == {b"%d" % i for i in range(60)}


def test_broker_commands_name_the_brokers_there_are(kafka: LocalKafka) -> None:
    for command in ("kill-broker", "restart-broker", "start-broker"):
        run = subprocess.run([str(SCRIPT), command, "3"], capture_output=True, text=True)
        assert run.returncode == 1
        assert "no broker 3: brokers are numbered 0 to 2" in run.stderr
