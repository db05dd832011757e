"""The dead-letter writer against the real local broker: pipelining, a letter the DLQ refuses
(contained to that letter, said loudly, never dropped), recovery once an operator fixes the
topic, and the failure causes."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    GroupAuthorizationFailedError,
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    NotEnoughReplicasError,
    NotLeaderForPartitionError,
    OutOfOrderSequenceNumber,
    RecordListTooLargeError,
    RecordTooLargeError,
    RequestTimedOutError,
    TopicAlreadyExistsError,
    TopicAuthorizationFailedError,
    TransactionalIdAuthorizationFailed,
    UnknownTopicOrPartitionError,
)
from kafka_sidecar_transcoder import Transcoded

from sidecar import wire
from sidecar.deadletters import CAUSES, DeadLetter, DeadLetterWriter, classify
from sidecar.inflight import Pending
from tests.localkafka import LocalKafka

TopicFactory = Callable[..., Awaitable[str]]

BIG = 1_200_000


class Recorder:
    """The callbacks `run` is given: what was written, and the health it reported."""

    def __init__(self) -> None:
        self.written: list[DeadLetter] = []
        self.written_at: list[float] = []
        self.health: list[bool] = []

    def on_written(self, letter: DeadLetter) -> None:
        self.written.append(letter)
        self.written_at.append(time.monotonic())

    async def set_healthy(self, healthy: bool) -> None:
        self.health.append(healthy)

    def count(self, letter: DeadLetter) -> int:
        return sum(1 for written in self.written if written is letter)


async def wait_until(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.05)


async def produce(
    kafka: LocalKafka,
    topic: str,
    values: list[bytes],
    *,
    keys: bool = True,
    max_request_size: int = 1_048_576,
) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=kafka.plaintext,
        acks="all",
        linger_ms=5,
        max_request_size=max_request_size,
    )
    await producer.start()
    try:
        futures = [
            await producer.send(
                topic,
                value=value,
                key=f"k{i % 97}".encode() if keys else None,
                headers=[("origin", b"test"), ("seq", str(i).encode())],
            )
            for i, value in enumerate(values)
        ]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def fetch(kafka: LocalKafka, topic: str, count: int) -> list[Any]:
    """Every record of `topic` (ConsumerRecords, as the sidecar fetches them)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=kafka.plaintext,
        enable_auto_commit=False,
        max_partition_fetch_bytes=4 * 1024 * 1024,
        fetch_max_bytes=16 * 1024 * 1024,
    )
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            await consumer._client.force_metadata_update()
            partitions = consumer.partitions_for_topic(topic) or {0}
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        records: list[Any] = []
        async with asyncio.timeout(60):
            while len(records) < count:
                for batch in (await consumer.getmany(timeout_ms=500)).values():
                    records.extend(batch)
        assert len(records) == count
        return records
    finally:
        await consumer.stop()


def letter_for(record: Any, attempts: int = 3) -> DeadLetter:
    size = len(record.value or b"") + len(record.key or b"")
    fetch = Transcoded(b"", [0], [record.offset], [size], record.offset + 1, 1)
    pending = Pending.of((record.topic, record.partition), fetch, 0, 1, 0.0, 0)
    pending.attempts = attempts
    message = wire.Message(
        record.topic,
        record.partition,
        record.offset,
        record.timestamp,
        record.timestamp_type,
        record.key,
        record.value,
        tuple(record.headers),
    )
    return DeadLetter(pending, f"gave up on {record.offset}", message)


def where(letter: DeadLetter) -> tuple[str, int, int]:
    topic, partition = letter.pending.tp
    return topic, partition, letter.pending.offset


def origin(record: Any) -> tuple[str, int, int]:
    headers = dict(record.headers)
    return (
        headers["x-dlq-original-topic"].decode(),
        int(headers["x-dlq-original-partition"]),
        int(headers["x-dlq-original-offset"]),
    )


async def start_writer(
    kafka: LocalKafka, dlq: str, **kwargs: Any
) -> tuple[DeadLetterWriter, Recorder, asyncio.Task[None]]:
    writer = DeadLetterWriter(
        dlq,
        "dlq-test-group",
        kafka.client_kwargs("plaintext"),
        config_key="subscriptions[0].dead_letter.topic",
        **kwargs,
    )
    await writer.start()
    recorder = Recorder()
    task = asyncio.create_task(writer.run(recorder.on_written, recorder.set_healthy))
    return writer, recorder, task


async def alter_topic(kafka: LocalKafka, topic: str, configs: dict[str, str]) -> None:
    """What an operator does to fix a DLQ topic (replaces its dynamic configs)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.plaintext)
    await admin.start()
    try:
        (response,) = await admin.alter_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topic, configs=configs)]
        )
    finally:
        await admin.close()
    assert all(resource[0] == 0 for resource in response.resources), response


async def stop_writer(writer: DeadLetterWriter, task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await writer.stop()


async def test_thousands_of_letters_are_pipelined_each_confirmed_once(
    kafka: LocalKafka, new_topic: TopicFactory
) -> None:
    source = await new_topic(partitions=4)
    dlq = await new_topic(partitions=3)
    count = 5000
    await produce(kafka, source, [b"v" * 200 + str(i).encode() for i in range(count)])
    letters = [letter_for(record) for record in await fetch(kafka, source, count)]

    writer, recorder, task = await start_writer(kafka, dlq, max_in_flight=64)
    try:
        started = time.monotonic()
        for letter in letters:
            writer.submit(letter)
        await wait_until(lambda: len(recorder.written) >= count, timeout=120)
        elapsed = recorder.written_at[-1] - started
        print(f"\ndead-lettered {count} records in {elapsed:.2f} s: {count / elapsed:,.0f}/s")
        await asyncio.sleep(0.5)  # nothing is reported twice, even late
    finally:
        await stop_writer(writer, task)

    assert len(recorder.written) == count
    assert {id(letter) for letter in recorder.written} == {id(letter) for letter in letters}
    assert writer.written == count
    assert writer.failures == dict.fromkeys(CAUSES, 0)
    assert recorder.health == []
    assert writer.failing == []

    written = await fetch(kafka, dlq, count)
    by_origin = {origin(record): record for record in written}
    assert set(by_origin) == {where(letter) for letter in letters}
    for letter in letters[:50]:
        record = by_origin[where(letter)]
        source_record = letter.message
        assert record.value == source_record.value
        assert record.key == source_record.key
        headers = list(record.headers)
        assert headers[:2] == list(source_record.headers)
        fields = dict(headers[2:])
        assert fields["x-dlq-consumer-group"] == b"dlq-test-group"
        assert fields["x-dlq-reason"] == letter.reason.encode()
        assert fields["x-dlq-attempts"] == b"3"
        assert fields["x-dlq-original-timestamp"] == str(source_record.timestamp).encode()
        assert int(fields["x-dlq-failed-at"]) > 0


async def test_a_record_too_large_for_the_dlq_fails_alone_loudly_and_is_kept(
    kafka: LocalKafka, new_topic: TopicFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sidecar.deadletters")
    source = await new_topic(partitions=2, config={"max.message.bytes": "4000000"})
    dlq = await new_topic(partitions=1, config={"max.message.bytes": "1048576"})
    small = 300
    values = [b"s" * 100] * small
    values.insert(small // 2, b"B" * BIG)
    await produce(kafka, source, values, max_request_size=4 * 1024 * 1024)
    letters = [letter_for(record) for record in await fetch(kafka, source, small + 1)]
    (big,) = [letter for letter in letters if len(letter.message.value or b"") == BIG]

    writer, recorder, task = await start_writer(kafka, dlq, permanent_retry_s=1.0)
    try:
        for letter in letters:
            writer.submit(letter)
        await wait_until(lambda: len(recorder.written) >= small)
        await wait_until(lambda: writer.failures["record_too_large"] >= 2 and bool(recorder.health))
        assert recorder.count(big) == 0
        failing = writer.failing
    finally:
        await stop_writer(writer, task)

    assert len(recorder.written) == small
    assert all(recorder.count(letter) == 1 for letter in letters if letter is not big)
    assert recorder.health[0] is False
    assert [(f.letter, f.cause) for f in failing] == [(big, "record_too_large")]
    assert failing[0].failures >= 2
    topic, partition, offset = where(big)
    lines = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.ERROR and f"{topic}[{partition}]@{offset}" in r.getMessage()
    ]
    assert lines, caplog.text
    assert "record_too_large" in lines[0]
    assert dlq in lines[0]
    assert "MessageSizeTooLarge" in lines[0]
    # The small letters are all in the DLQ; the big one is not.
    assert {origin(r) for r in await fetch(kafka, dlq, small)} == {
        where(letter) for letter in letters if letter is not big
    }


async def test_a_refused_batch_does_not_take_the_letters_behind_it_down(
    kafka: LocalKafka, new_topic: TopicFactory
) -> None:
    """A letter small enough for the pipelined producer, refused by a DLQ with a low limit:
    aiokafka's idempotent producer then fails every later batch to that partition
    (OutOfOrderSequenceNumber), so the writer replaces it; the letters behind are resent,
    not counted as failures, and all get written."""
    source = await new_topic(partitions=1)
    dlq = await new_topic(partitions=1, config={"max.message.bytes": "50000"})
    values = [b"s" * 100] * 400
    values.insert(100, b"M" * 60_000)
    await produce(kafka, source, values)
    letters = [letter_for(record) for record in await fetch(kafka, source, len(values))]
    medium = letters[100]

    writer, recorder, task = await start_writer(kafka, dlq, permanent_retry_s=600)
    try:
        for letter in letters:
            writer.submit(letter)
        await wait_until(lambda: len(recorder.written) >= len(letters) - 1)
        await wait_until(lambda: writer.failures["record_too_large"] >= 1)
        assert recorder.count(medium) == 0
        assert [(f.letter, f.cause) for f in writer.failing] == [(medium, "record_too_large")]
    finally:
        await stop_writer(writer, task)
    assert writer.failures == {
        "record_too_large": 1,
        "authorization": 0,
        "unknown_topic": 0,
        "transient": 0,
    }
    assert all(recorder.count(letter) == 1 for letter in letters if letter is not medium)


async def test_a_failing_letter_is_written_once_the_operator_fixes_the_topic(
    kafka: LocalKafka, new_topic: TopicFactory
) -> None:
    source = await new_topic(partitions=1, config={"max.message.bytes": "4000000"})
    dlq = await new_topic(partitions=1, config={"max.message.bytes": "1048576"})
    await produce(
        kafka, source, [b"a" * 10, b"B" * BIG, b"c" * 10], max_request_size=4 * 1024 * 1024
    )
    letters = [letter_for(record) for record in await fetch(kafka, source, 3)]
    big = letters[1]

    writer, recorder, task = await start_writer(kafka, dlq, permanent_retry_s=0.5)
    try:
        for letter in letters:
            writer.submit(letter)
        await wait_until(lambda: writer.failures["record_too_large"] >= 1 and bool(recorder.health))
        assert recorder.health == [False]
        assert recorder.count(big) == 0

        await alter_topic(kafka, dlq, {"max.message.bytes": "4000000"})

        await wait_until(lambda: recorder.count(big) == 1)
        await wait_until(lambda: recorder.health[-1] is True)
        await asyncio.sleep(1.5)  # a few more retry intervals: nothing is written twice
    finally:
        await stop_writer(writer, task)

    assert [recorder.count(letter) for letter in letters] == [1, 1, 1]
    assert recorder.health == [False, True]
    assert writer.failing == []
    assert writer.written == 3
    (record,) = [r for r in await fetch(kafka, dlq, 3) if origin(r) == where(big)]
    assert record.value == big.message.value


async def test_an_unconfirmed_write_counts_as_transient_until_the_broker_takes_it(
    kafka: LocalKafka, new_topic: TopicFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """The DLQ topic vanishes under a running writer: aiokafka's idempotent producer retries
    the batch (UNKNOWN_TOPIC_OR_PARTITION is retriable) and the send neither fails nor
    completes. The writer flags the letter after `confirm_timeout_s` and keeps waiting; once
    the topic is back, the letter is written once and health comes back."""
    source = await new_topic(partitions=1)
    dlq = await new_topic(partitions=1)
    await produce(kafka, source, [b"x" * 10, b"y" * 10])
    first, letter = [letter_for(record) for record in await fetch(kafka, source, 2)]

    writer, recorder, task = await start_writer(kafka, dlq, confirm_timeout_s=1.0)
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.plaintext)
    await admin.start()
    try:
        writer.submit(first)  # the producer learns the topic's metadata
        await wait_until(lambda: recorder.count(first) == 1)
        await admin.delete_topics([dlq])

        writer.submit(letter)
        await wait_until(lambda: writer.failures["transient"] >= 1 and bool(recorder.health))
        assert recorder.health == [False]
        assert [(f.letter, f.cause) for f in writer.failing] == [(letter, "transient")]
        topic, partition, offset = where(letter)
        assert any(
            r.levelno == logging.ERROR
            and f"{topic}[{partition}]@{offset}" in r.getMessage()
            and "transient" in r.getMessage()
            for r in caplog.records
        ), caplog.text

        async with asyncio.timeout(60):
            while True:
                try:
                    await admin.create_topics([NewTopic(dlq, 1, 1)])
                    break
                except TopicAlreadyExistsError:  # the deletion is still under way
                    await asyncio.sleep(0.5)
        await wait_until(lambda: recorder.count(letter) == 1)
        await wait_until(lambda: recorder.health[-1] is True)
    finally:
        await admin.close()
        await stop_writer(writer, task)
    assert recorder.health == [False, True]
    assert writer.failing == []
    assert [origin(r) for r in await fetch(kafka, dlq, 1)] == [where(letter)]


async def test_a_record_without_key_or_value_is_dead_lettered(
    kafka: LocalKafka, new_topic: TopicFactory
) -> None:
    """aiokafka's `send` refuses a record with neither key nor value; the writer must not."""
    source = await new_topic(partitions=1)
    dlq = await new_topic(partitions=1)
    producer = AIOKafkaProducer(bootstrap_servers=kafka.plaintext, acks="all")
    await producer.start()
    try:
        batch = producer.create_batch()
        batch.append(key=None, value=None, timestamp=None, headers=[])
        await (await producer.send_batch(batch, source, partition=0))
    finally:
        await producer.stop()
    (letter,) = [letter_for(record) for record in await fetch(kafka, source, 1)]

    writer, recorder, task = await start_writer(kafka, dlq)
    try:
        writer.submit(letter)
        await wait_until(lambda: recorder.count(letter) == 1)
    finally:
        await stop_writer(writer, task)
    (record,) = await fetch(kafka, dlq, 1)
    assert (record.key, record.value) == (None, None)
    assert origin(record) == where(letter)


@pytest.mark.parametrize(
    ("error", "cause"),
    [
        (MessageSizeTooLargeError(), "record_too_large"),
        (RecordListTooLargeError(), "record_too_large"),
        (RecordTooLargeError(), "record_too_large"),
        (TopicAuthorizationFailedError("dlq"), "authorization"),
        (ClusterAuthorizationFailedError(), "authorization"),
        (GroupAuthorizationFailedError(), "authorization"),
        (TransactionalIdAuthorizationFailed(), "authorization"),
        (UnknownTopicOrPartitionError(), "unknown_topic"),
        (OutOfOrderSequenceNumber(), "transient"),
        (NotLeaderForPartitionError(), "transient"),
        (NotEnoughReplicasError(), "transient"),
        (RequestTimedOutError(), "transient"),
        (KafkaTimeoutError(), "transient"),
        (KafkaConnectionError(), "transient"),
        (KafkaError("unexpected"), "transient"),
        (AssertionError("neither key nor value"), "transient"),
    ],
)
def test_classify(error: BaseException, cause: str) -> None:
    assert classify(error) == cause


def test_classify_looks_through_wrappers() -> None:
    wrapped = KafkaError("Unexpected error during batch delivery")
    wrapped.__cause__ = TopicAuthorizationFailedError("dlq")
    assert classify(wrapped) == "authorization"
