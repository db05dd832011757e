"""Prometheus metrics move with traffic; logs are JSON lines and never carry secrets."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator

import grpc
from aiokafka import AIOKafkaProducer
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

from kafkasidecar.v1 import consumer_pb2 as pb
from sidecar.config import SubscriptionConfig
from sidecar.metrics import SidecarCollector
from sidecar.subscription import GroupSubscription
from tests.localkafka import LocalKafka
from tests.sidecarproc import AppStream, SidecarProcess, group_subscription, ref
from tests.test_delivery import produce, wait_committed
from tests.test_failures import nack
from tests.test_server import free_port

TopicFactory = Callable[..., Awaitable[str]]
StartSidecar = Callable[..., Awaitable[SidecarProcess]]


async def scrape(address: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    def fetch() -> str:
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
            return str(response.read().decode())

    text = await asyncio.to_thread(fetch)
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_metrics_move_with_traffic(
    kafka: LocalKafka,
    new_topic: TopicFactory,
    producer: AIOKafkaProducer,
    start_sidecar: StartSidecar,
) -> None:
    topic, dlq = await new_topic(partitions=2), await new_topic()
    await produce(producer, topic, 40, partitions=2)
    address = f"127.0.0.1:{free_port()}"
    sub = group_subscription(
        "metered", topic, dead_letter={"topic": dlq}, batch={"max_records": 10}
    )
    sidecar = await start_sidecar([sub], listener="iam", metrics=address)
    before = await scrape(address)
    before_time = time.time()
    s = (("subscription", "metered"),)
    assert ("kafka_sidecar_last_commit_timestamp_seconds", s) not in before
    assert before[("kafka_sidecar_records_delivered_total", s)] == 0
    assert before[("kafka_sidecar_token_refreshes_total", ())] >= 1

    async with grpc.aio.insecure_channel(sidecar.address) as channel:
        app = AppStream(channel)
        await app.open("metered")
        first = (await app.next("batch")).batch
        app.send(nack([first.records[0]], pb.NACK_ACTION_DEAD_LETTER, reason="bad"))
        app.send(nack([first.records[1]], retry_after_ms=10))
        app.ack(records=[ref(r) for r in first.records[2:]])
        held = (await app.next("batch")).batch
        during = await scrape(address)
        app.ack(batch_ids=[held.batch_id])
        while True:
            try:
                batch = (await app.next("batch", timeout=3)).batch
            except TimeoutError:
                break
            app.ack(batch_ids=[batch.batch_id])
        await wait_committed(kafka, sub["group_id"], topic)
        after = await scrape(address)
        app.close()

    assert during[("kafka_sidecar_streams", s)] == 1
    assert during[("kafka_sidecar_in_flight_records", s)] >= len(held.records)
    assert after[("kafka_sidecar_records_delivered_total", s)] >= 40
    assert after[("kafka_sidecar_acks_total", s)] >= 38
    assert after[("kafka_sidecar_nacks_total", (("action", "dead_letter"), *s))] == 1
    assert after[("kafka_sidecar_nacks_total", (("action", "retry"), *s))] == 1
    assert after[("kafka_sidecar_redeliveries_total", s)] >= 1
    assert after[("kafka_sidecar_dead_lettered_total", s)] == 1
    assert after[("kafka_sidecar_commits_total", (("result", "ok"), *s))] >= 1
    assert after[("kafka_sidecar_commit_seconds_count", s)] >= 1
    assert after[("kafka_sidecar_last_commit_timestamp_seconds", s)] > before_time
    assert after[("kafka_sidecar_subscription_serving", s)] == 1
    assert after[("kafka_sidecar_in_flight_records", s)] == 0
    lags = {k: v for k, v in after.items() if k[0] == "kafka_sidecar_consumer_lag"}
    assert len(lags) == 2
    assert set(lags.values()) == {0}
    assert after[("process_resident_memory_bytes", ())] > 0


async def test_logs_are_json_lines_without_secrets(
    kafka: LocalKafka,
    new_topic: TopicFactory,
    producer: AIOKafkaProducer,
    start_sidecar: StartSidecar,
) -> None:
    topic = await new_topic()
    await produce(producer, topic, 5)
    token = "app-token-d0c1a5e"
    runs = []
    for listener in ("iam", "scram"):
        sub = group_subscription(f"secret-{listener}", topic)
        sidecar = await start_sidecar([sub], listener=listener, auth_token=token)
        async with grpc.aio.insecure_channel(sidecar.address) as channel:
            app = AppStream(channel, metadata=[("authorization", f"Bearer {token}")])
            await app.open(sub["name"])
            batch = (await app.next("batch")).batch
            app.ack(batch_ids=[batch.batch_id])
            await wait_committed(kafka, sub["group_id"], topic)
            app.close()
        sidecar.stop()
        runs.append(sidecar.logs())

    secrets = [
        kafka.aws_secret_access_key,
        kafka.scram_password,
        token,
        "X-Amz-Signature",  # inside every MSK IAM token
        "X-Amz-Credential",
    ]
    for text in runs:
        lines = [line for line in text.splitlines() if line.strip()]
        assert len(lines) > 5
        for line in lines:
            entry = json.loads(line)  # every line is one JSON object
            assert {"ts", "level", "logger", "msg"} <= entry.keys()
        for secret in secrets:
            assert secret not in text


async def test_a_scrape_reads_the_event_loops_state_on_the_loop() -> None:
    """The HTTP server scrapes from its own thread; the state belongs to the event loop, so
    the collector builds the scrape there (a dict changing mid-iteration failed scrapes)."""
    config = SubscriptionConfig(name="s", topics=["t"], group_id="g")
    collector = SidecarCollector(
        {"s": GroupSubscription(config, {}, None)}, None, asyncio.get_running_loop()
    )
    built_on: list[int] = []
    collect = collector._collect

    def recording() -> Iterator[Metric]:
        built_on.append(threading.get_ident())
        return collect()

    collector._collect = recording  # type: ignore[method-assign]
    families = await asyncio.to_thread(lambda: list(collector.collect()))
    assert built_on == [threading.get_ident()]
    assert "kafka_sidecar_acks" in {family.name for family in families}
