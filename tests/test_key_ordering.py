"""`ordering: key` end to end (real broker, real sidecar process, real gRPC): one key's
records one at a time and in offset order, different keys of one partition at once and on
several streams, poison isolation per key."""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict

from aiokafka import AIOKafkaConsumer

from kafkasidecar.v1 import consumer_pb2 as pb
from tests.harness import Consuming, consuming
from tests.localkafka import LocalKafka
from tests.sidecarproc import AppStream, ref
from tests.test_metrics import scrape
from tests.test_server import free_port

RECORDS = 20_000
KEYS = 500


def key(i: int) -> bytes:
    return b"key-%d" % (i % KEYS)


async def produce_keyed(c: Consuming, count: int) -> None:
    for i in range(count):
        await c.producer.send(c.topic, b"%d" % i, key=key(i), partition=0)
    await c.producer.flush()


async def test_keys_stay_in_order_while_streams_share_one_partition(kafka: LocalKafka) -> None:
    """One partition, 20,000 records over 500 keys, three streams acking after random delays
    and now and then nacking a record: each key's records arrive in offset order (a retry
    comes back before anything after it), several streams hold records of the one partition
    at once, and the commit reaches the end."""
    arrivals: dict[bytes, list[int]] = defaultdict(list)
    acked: set[int] = set()
    holding: dict[int, int] = {}
    most_streams_at_once = 0
    rng = random.Random(12)

    async def app(stream: AppStream, index: int) -> None:
        nonlocal most_streams_at_once
        while len(acked) < RECORDS:
            try:
                batch = await c.batch(stream, timeout=5)
            except TimeoutError:
                continue
            for record in batch.records:
                arrivals[record.key].append(record.offset)
            holding[index] = len(batch.records)
            most_streams_at_once = max(most_streams_at_once, sum(1 for n in holding.values() if n))
            await asyncio.sleep(rng.uniform(0, 0.02))
            retry = [r for r in batch.records if rng.random() < 0.01]
            if retry:
                stream.send(
                    pb.ConsumeRequest(
                        nack=pb.Nack(
                            records=[ref(r) for r in retry],
                            action=pb.NACK_ACTION_RETRY,
                            retry_after_ms=1,
                        )
                    )
                )
            stream.ack(records=[ref(r) for r in batch.records if r not in retry])
            acked.update(r.offset for r in batch.records if r not in retry)
            holding[index] = 0

    async with consuming(
        kafka,
        "by-key",
        prepare=lambda c: produce_keyed(c, RECORDS),
        ordering="key",
        batch={"max_records": 100, "max_wait_ms": 10},
        retry={"initial_backoff_ms": 1, "max_backoff_ms": 10, "max_attempts": 1000},
        max_outstanding_batches=4,
    ) as c:
        assert c.opened.ordering == pb.ORDERING_KEY
        streams = [c.app, await c.open_stream(4), await c.open_stream(4)]
        async with asyncio.timeout(300):
            await asyncio.gather(*(app(s, i) for i, s in enumerate(streams)))
        await c.wait_committed()

    assert len(acked) == RECORDS
    assert set(arrivals) == {key(i) for i in range(KEYS)}
    for k, offsets in arrivals.items():
        assert offsets == sorted(offsets), f"{k!r} out of order: {offsets}"
    assert most_streams_at_once >= 2


async def test_a_poison_key_holds_back_only_itself_until_it_is_dead_lettered(
    kafka: LocalKafka,
) -> None:
    """A key whose every record is nacked holds back only its own later records: the other
    keys flow, and after `max_attempts` each of its records goes to the DLQ, in order, and
    the key moves on. The commit reaches the end."""
    count, poison = 2_000, key(0)
    seen: dict[bytes, list[int]] = defaultdict(list)
    metrics = f"127.0.0.1:{free_port()}"
    held: list[float] = []
    async with consuming(
        kafka,
        "poison-key",
        prepare=lambda c: produce_keyed(c, count),
        dead_letter=True,
        ordering="key",
        batch={"max_records": 100, "max_wait_ms": 10},
        retry={"initial_backoff_ms": 5, "max_backoff_ms": 20, "max_attempts": 3},
        sidecar_options={"metrics": metrics},
        max_outstanding_batches=1,
    ) as c:
        settled = 0
        async with asyncio.timeout(300):
            while settled < count:
                batch = await c.batch()
                for record in batch.records:
                    seen[record.key].append(record.offset)
                if len(held) < 3:
                    # The batch is out: each of its keys is held, in its one partition.
                    samples = await scrape(metrics)
                    s = (("subscription", c.name),)
                    held.append(samples[("kafka_sidecar_keys_held", s)])
                    partition = (("partition", "0"), *s, ("topic", c.topic))
                    in_flight = samples[("kafka_sidecar_partition_in_flight_records", partition)]
                    assert in_flight >= len(batch.records)
                bad = [ref(r) for r in batch.records if r.key == poison]
                good = [ref(r) for r in batch.records if r.key != poison]
                if bad:
                    c.app.send(
                        pb.ConsumeRequest(
                            nack=pb.Nack(records=bad, action=pb.NACK_ACTION_RETRY, reason="poison")
                        )
                    )
                c.app.ack(records=good)
                settled += len(good) + sum(
                    1 for r in batch.records if r.key == poison and r.delivery_attempt == 3
                )
        await c.wait_committed()
        assert c.dlq is not None
        letters = await read_all(kafka, c.dlq, count // KEYS)

    assert min(held) >= 1
    poison_offsets = [i for i in range(count) if key(i) == poison]
    # Three deliveries each, one record at a time, in offset order.
    assert seen[poison] == [o for o in poison_offsets for _ in range(3)]
    assert [int(v) for v in letters] == poison_offsets
    for k, offsets in seen.items():
        if k != poison:
            assert offsets == sorted(offsets)
            assert len(offsets) == len(set(offsets))


async def read_all(kafka: LocalKafka, topic: str, count: int) -> list[bytes]:
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=kafka.plaintext, auto_offset_reset="earliest"
    )
    await consumer.start()
    values: list[bytes] = []
    try:
        async with asyncio.timeout(60):
            while len(values) < count:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    values.extend(r.value for r in records if r.value is not None)
    finally:
        await consumer.stop()
    return values
