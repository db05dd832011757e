"""Ack outputs (consume-transform-produce) on the real broker: exactly once with transactions,
at least once without, and what happens to outputs that cannot be written (sidecar/outputs.py).

The crash, rebalance and zombie proofs of exactly-once are tests/test_outputs_crashes.py.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable

from kafkasidecar.v1 import consumer_pb2 as pb
from tests.harness import consuming, read_all
from tests.localkafka import LocalKafka
from tests.sidecarproc import ref
from tests.test_metrics import scrape
from tests.test_server import free_port

TopicFactory = Callable[..., Awaitable[str]]
TRANSACTIONS = {"enabled": True, "transactional_id_prefix": "test"}


def outputs_for(batch: pb.Batch, topic: str) -> list[pb.OutputRecord]:
    """One output per record, naming its input: value `<partition>:<offset>`."""
    return [
        pb.OutputRecord(
            topic=topic,
            key=r.key,
            value=f"{r.partition}:{r.offset}".encode(),
            headers=[pb.Header(key="x-source-offset", value=str(r.offset).encode())],
        )
        for r in batch.records
    ]


def ack_with(batch: pb.Batch, outputs: list[pb.OutputRecord]) -> pb.ConsumeRequest:
    return pb.ConsumeRequest(ack=pb.Ack(batch_ids=[batch.batch_id], outputs=outputs))


async def read_outputs(
    kafka: LocalKafka, topic: str, *, committed_only: bool = True
) -> list[bytes]:
    """Every output record's value, read as a `read_committed` consumer would (or not)."""
    isolation = "read_committed" if committed_only else "read_uncommitted"
    records = await read_all(kafka, topic, isolation_level=isolation)
    return [r.value for r in records if r.value is not None]


async def test_transactional_outputs_are_written_exactly_once_with_the_commit(
    kafka: LocalKafka, new_topic: TopicFactory
) -> None:
    out = await new_topic(partitions=2)
    metrics = f"127.0.0.1:{free_port()}"
    async with consuming(
        kafka,
        "txn",
        partitions=3,
        records=600,
        transactions=TRANSACTIONS,
        sidecar_options={"metrics": metrics},
    ) as c:
        assert c.opened.transactional
        seen: Counter[tuple[int, int]] = Counter()
        while sum(seen.values()) < 600:
            batch = await c.batch()
            assert len({r.partition for r in batch.records}) == 1, "a batch mixes partitions"
            seen.update((r.partition, r.offset) for r in batch.records)
            c.app.send(ack_with(batch, outputs_for(batch, out)))
        await c.wait_committed()
        assert set(seen) == set(c.produced)
        scraped = await scrape(metrics)
    s = (("subscription", "txn"),)
    assert scraped[("kafka_sidecar_outputs_produced_total", s)] == 600
    committed = scraped[("kafka_sidecar_transactions_total", (("outcome", "committed"), *s))]
    assert committed >= len(c.produced) / 100  # at least one per batch's worth
    assert scraped[("kafka_sidecar_transactions_total", (("outcome", "aborted"), *s))] == 0
    assert scraped[("kafka_sidecar_transaction_seconds_count", s)] == committed
    assert scraped[("kafka_sidecar_acks_with_outputs_total", s)] >= 600 / 100
    # Its transactions are its commits.
    assert scraped[("kafka_sidecar_commits_total", (("result", "ok"), *s))] == committed
    assert scraped[("kafka_sidecar_last_commit_timestamp_seconds", s)] > 0
    values = Counter(await read_outputs(kafka, out))
    expected = {f"{p}:{o}".encode() for p, o in c.produced}
    assert set(values) == expected
    assert max(values.values()) == 1, values.most_common(3)


async def test_outputs_without_transactions_are_written_before_the_records_settle(
    kafka: LocalKafka, new_topic: TopicFactory
) -> None:
    out = await new_topic()
    async with consuming(kafka, "plain", partitions=2, records=300) as c:
        assert not c.opened.transactional
        got = 0
        while got < 300:
            batch = await c.batch()
            got += len(batch.records)
            c.app.send(ack_with(batch, outputs_for(batch, out)))
        await c.wait_committed()
        c.app.send(ack_with(batch, [pb.OutputRecord(value=b"no topic")]))
        rejected = (await c.app.next("rejected")).rejected
        assert rejected.reason == pb.REJECT_REASON_INVALID
        assert rejected.message == "outputs[0] has no topic"
    values = Counter(await read_outputs(kafka, out))
    assert set(values) == {f"{p}:{o}".encode() for p, o in c.produced}


async def test_an_ack_with_outputs_naming_two_partitions_is_refused_under_transactions(
    kafka: LocalKafka, new_topic: TopicFactory
) -> None:
    out = await new_topic()
    async with consuming(kafka, "txn", partitions=2, records=20, transactions=TRANSACTIONS) as c:
        first = await c.batch()
        second = await c.batch()
        assert first.records[0].partition != second.records[0].partition
        refs = [ref(first.records[0]), ref(second.records[0])]
        c.app.send(
            pb.ConsumeRequest(
                ack=pb.Ack(records=refs, outputs=[pb.OutputRecord(topic=out, value=b"x")])
            )
        )
        rejected = (await c.app.next("rejected")).rejected
        assert rejected.reason == pb.REJECT_REASON_INVALID
        assert "one partition" in rejected.message
        # Nothing was settled: the records are still held, and plain acks settle them.
        c.ack(first, second)
        got = len(first.records) + len(second.records)
        while got < 20:
            batch = await c.batch()
            got += len(batch.records)
            c.ack(batch)
        await c.wait_committed()
    assert await read_outputs(kafka, out) == []


async def test_outputs_the_broker_refuses_send_the_records_back_then_to_the_dead_letters(
    kafka: LocalKafka, new_topic: TopicFactory
) -> None:
    """The output is too large for its topic: the transaction aborts, the record comes back
    as if nacked, and once its attempts run out it is dead-lettered (and committed)."""
    out = await new_topic(config={"max.message.bytes": "1000"})
    metrics = f"127.0.0.1:{free_port()}"
    async with consuming(
        kafka,
        "txn",
        records=1,
        dead_letter=True,
        transactions=TRANSACTIONS,
        retry={"max_attempts": 2, "initial_backoff_ms": 100, "max_backoff_ms": 200},
        sidecar_options={"metrics": metrics},
    ) as c:
        attempts = []
        for _ in range(2):
            batch = await c.batch()
            attempts.append(batch.records[0].delivery_attempt)
            c.app.send(ack_with(batch, [pb.OutputRecord(topic=out, value=b"x" * 5000)]))
        assert attempts == [1, 2]
        await c.wait_committed()
        assert c.dlq is not None
        (letter,) = await read_outputs(kafka, c.dlq, committed_only=False)
        assert letter == c.produced[(0, 0)]
        assert "its outputs could not be written (record_too_large" in c.sidecar.logs()
        scraped = await scrape(metrics)
    s = (("subscription", "txn"),)
    assert scraped[("kafka_sidecar_transactions_total", (("outcome", "aborted"), *s))] == 2
    assert scraped[("kafka_sidecar_output_failed_records_total", s)] == 2
    assert scraped[("kafka_sidecar_dead_lettered_total", s)] == 1
    assert await read_outputs(kafka, out) == []
