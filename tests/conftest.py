from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from tests.localkafka import LocalKafka
from tests.sidecarproc import SidecarProcess

TopicFactory = Callable[..., Awaitable[str]]


@pytest.fixture(scope="session")
def kafka() -> LocalKafka:
    """The local broker of scripts/local-kafka, started if it is not running."""
    return LocalKafka.ensure_started()


@pytest.fixture
async def new_topic(
    kafka: LocalKafka, request: pytest.FixtureRequest
) -> AsyncIterator[TopicFactory]:
    """Makes topics with unique names (so one broker serves the whole run); deletes them after."""
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.plaintext)
    await admin.start()
    made: list[str] = []
    prefix = request.node.name.split("[")[0].replace("_", "-")[:40]

    async def make(
        partitions: int = 1, config: dict[str, str] | None = None, name: str | None = None
    ) -> str:
        name = name or f"{prefix}-{uuid.uuid4().hex[:10]}"
        await admin.create_topics(
            [
                NewTopic(
                    name,
                    num_partitions=partitions,
                    replication_factor=kafka.replication_factor,
                    topic_configs=config or {},
                )
            ]
        )
        made.append(name)
        return name

    try:
        yield make
    finally:
        if made:
            await admin.delete_topics(made)
        await admin.close()


@pytest.fixture
async def start_sidecar(
    kafka: LocalKafka,
) -> AsyncIterator[Callable[..., Awaitable[SidecarProcess]]]:
    """Starts real `kafka-sidecar run` processes and waits until they serve; stops them after."""
    started: list[SidecarProcess] = []

    async def start(subscriptions: list[dict[str, Any]], **kwargs: Any) -> SidecarProcess:
        proc = SidecarProcess(kafka, subscriptions, **kwargs).start()
        started.append(proc)
        await proc.wait_serving()
        return proc

    try:
        yield start
    finally:
        for proc in started:
            proc.stop()


@pytest.fixture
async def producer(kafka: LocalKafka) -> AsyncIterator[AIOKafkaProducer]:
    producer = AIOKafkaProducer(bootstrap_servers=kafka.plaintext, acks="all", linger_ms=5)
    await producer.start()
    try:
        yield producer
    finally:
        await producer.stop()
