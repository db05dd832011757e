"""Broker faults under load on the three-broker bed, as MSK has them: a rolling restart (MSK's
patching), the partition leaders' broker killed, the group coordinator's broker restarted.

Each scenario delivers 200k records to an app that acks after random delays, and ends with
Kafka's committed offsets at the end offsets, every produced record delivered at least once,
duplicates within what was unsettled at the faults, no delivery gap over 60 s and no
error-level log after recovery. The `[figures]` line is the issue's per-scenario table row.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from tests.chaos import Cluster, Load, broker_command
from tests.localkafka import LocalKafka
from tests.sidecarproc import SidecarProcess, group_subscription
from tests.test_outputs import read_outputs
from tests.test_outputs_crashes import inputs_of

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(600)]

TopicFactory = Callable[..., Awaitable[str]]
StartSidecar = Callable[..., Awaitable[SidecarProcess]]

RECORDS = 200_000
PARTITIONS = 6
#: A fault may stop deliveries (leader elections, the coordinator moving), not for this long.
MAX_GAP_S = 60


@pytest.fixture
async def load(
    kafka: LocalKafka,
    new_topic: TopicFactory,
    start_sidecar: StartSidecar,
    unused_tcp_port: int,
    request: pytest.FixtureRequest,
) -> AsyncIterator[Load]:
    """A sidecar on the IAM listeners of all three brokers, consuming 200k records produced at
    `rate` per second (the parameter, with whether the app's acks carry outputs in
    transactions); records flow when the test gets it."""
    rate, transactions = request.param
    topic = await new_topic(partitions=PARTITIONS)
    outputs = await new_topic(partitions=PARTITIONS) if transactions else None
    sub = group_subscription(
        f"chaos-{uuid.uuid4().hex[:6]}",
        topic,
        commit_interval_ms=500,
        transactions={"enabled": transactions, "transactional_id_prefix": "chaos"},
    )
    metrics = f"127.0.0.1:{unused_tcp_port}"
    sidecar = await start_sidecar([sub], metrics=metrics)
    load = Load(
        kafka, sidecar, metrics, sub, topic, records=RECORDS, rate=rate, outputs_topic=outputs
    )
    try:
        await load.start()
        yield load
    finally:
        load.stop()


async def judge(load: Load, scenario: str) -> None:
    """Waits for the load to be delivered and committed, prints the figures, and checks the
    outcome by Kafka's view and the sidecar's log."""
    await load.finish()
    load.figures(scenario)
    assert load.produce_failures == 0
    assert len(load.produced) == RECORDS
    assert not load.produced - set(load.deliveries), "produced records never delivered"
    assert load.duplicates <= sum(f.unsettled for f in load.faults), load.faults
    assert load.max_gap() < MAX_GAP_S
    recovered = max(f.ended for f in load.faults)
    assert not load.errors_after(recovered)


@pytest.mark.parametrize("load", [(5000, False)], indirect=True)
async def test_rolling_restart_of_all_brokers(kafka: LocalKafka, load: Load) -> None:
    cluster = Cluster(kafka)
    for broker in range(3):
        async with load.fault(f"restart broker {broker}"):
            await broker_command("restart", broker)
            await cluster.wait_in_sync([load.topic, "__consumer_offsets"])
    await judge(load, "rolling restart")


@pytest.mark.parametrize("load", [(4000, True)], indirect=True)
async def test_rolling_restart_with_outputs_in_transactions(kafka: LocalKafka, load: Load) -> None:
    """Exactly-once outputs through MSK's patching: the transaction coordinators move with the
    brokers, and still every input's output is visible once (read_committed)."""
    cluster = Cluster(kafka)
    for broker in range(3):
        async with load.fault(f"restart broker {broker}"):
            await broker_command("restart", broker)
            await cluster.wait_in_sync([load.topic, "__consumer_offsets", "__transaction_state"])
    await judge(load, "rolling restart, outputs in transactions")
    assert load.outputs_topic is not None
    outputs = inputs_of(await read_outputs(kafka, load.outputs_topic))
    assert set(outputs) == load.produced
    assert max(outputs.values()) == 1, "an input's output is visible twice"


@pytest.mark.parametrize("load", [(5000, False)], indirect=True)
async def test_partition_leaders_broker_killed(kafka: LocalKafka, load: Load) -> None:
    cluster = Cluster(kafka)
    (leader, _), *_ = (await cluster.leaders(load.topic)).most_common()
    async with load.fault(f"SIGKILL broker {leader}, start 20 s later"):
        await broker_command("kill", leader)
        await asyncio.sleep(20)
        await broker_command("start", leader)
        await cluster.wait_in_sync([load.topic, "__consumer_offsets"])
    await judge(load, "leaders' broker SIGKILL")


@pytest.mark.parametrize("load", [(5000, False)], indirect=True)
async def test_group_coordinators_broker_restarted(kafka: LocalKafka, load: Load) -> None:
    cluster = Cluster(kafka)
    coordinator = await cluster.coordinator(load.group_id)
    async with load.fault(f"restart coordinator broker {coordinator}"):
        await broker_command("restart", coordinator)
        await cluster.wait_in_sync([load.topic, "__consumer_offsets"])
    await judge(load, "coordinator restart")
