"""sidecar/tap.py: aiokafka's own consumer handing over `Transcoded` fetches (real broker).

The reference is a plain AIOKafkaConsumer in the same process, reading the same offsets: the
records parsed back from the tapped consumer's `Record` bytes must equal its ConsumerRecords.
"""

from __future__ import annotations

import asyncio
import struct
import types
import uuid
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any, cast

import aiokafka
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.consumer import fetcher
from aiokafka.consumer.fetcher import FetchResult
from aiokafka.consumer.subscription_state import SubscriptionState
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.record.memory_records import MemoryRecords
from kafka_sidecar_transcoder import CorruptRecordError, Transcoded

from kafkasidecar.v1 import consumer_pb2 as pb
from sidecar import tap
from sidecar.consumer import Unreadable
from tests.conftest import TopicFactory
from tests.localkafka import LocalKafka

Headers = list[tuple[str, bytes | None]]
# topic, partition, offset, key, value, headers, timestamp, timestamp type (the proto's enum)
Row = tuple[str, int, int, bytes | None, bytes | None, Headers, int, int]


@pytest.fixture(autouse=True)
def _tapped() -> None:
    tap.install()


def rows(items: Iterable[Any]) -> list[Row]:
    """The records of a tapped consumer's items, parsed back."""
    out: list[Row] = []
    for item in items:
        assert isinstance(item, Transcoded), item
        assert len(item) > 0
        for piece in item.split():
            r = pb.Record.FromString(piece)
            headers = [(h.key, h.value if h.HasField("value") else None) for h in r.headers]
            key = r.key if r.HasField("key") else None
            value = r.value if r.HasField("value") else None
            row = (r.topic, r.partition, r.offset, key, value, headers, r.timestamp_ms)
            out.append((*row, r.timestamp_type))
        assert [row[2] for row in out[-len(item) :]] == item.offsets
    return sorted(out, key=lambda row: (row[1], row[2]))


def reference_rows(items: Iterable[Any]) -> list[Row]:
    out: list[Row] = []
    for m in items:
        assert isinstance(m, ConsumerRecord), m
        row = (m.topic, m.partition, m.offset, m.key, m.value, list(m.headers), m.timestamp)
        out.append((*row, m.timestamp_type + 1))
    return sorted(out, key=lambda row: (row[1], row[2]))


@asynccontextmanager
async def consumer(
    kafka: LocalKafka, topic: str, partitions: int, *, tapped: bool, **kwargs: Any
) -> AsyncIterator[AIOKafkaConsumer]:
    """Assigned all partitions of `topic`, or subscribed with a group when `group_id` is given."""
    c = AIOKafkaConsumer(
        bootstrap_servers=kafka.plaintext,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        key_deserializer=tap.TRANSCODE if tapped else None,
        **kwargs,
    )
    await c.start()
    try:
        if "group_id" in kwargs:
            c.subscribe(topics=[topic])
        else:
            c.assign([TopicPartition(topic, p) for p in range(partitions)])
        yield c
    finally:
        await c.stop()


async def ends(kafka: LocalKafka, topic: str, partitions: int) -> dict[TopicPartition, int]:
    async with consumer(kafka, topic, partitions, tapped=False) as c:
        got: dict[TopicPartition, int] = await c.end_offsets(list(c.assignment()))
        return got


async def drain(
    c: AIOKafkaConsumer, until: dict[TopicPartition, int], timeout: float = 60, **kwargs: Any
) -> list[Any]:
    """Every item getmany returns until the consumer's positions reach `until`."""
    items: list[Any] = []
    async with asyncio.timeout(timeout):
        while True:
            for got in (await c.getmany(timeout_ms=500, **kwargs)).values():
                items.extend(got)
            if set(c.assignment()) >= set(until):
                positions = [await c.position(tp) for tp in until]
                if all(p >= end for p, end in zip(positions, until.values(), strict=True)):
                    return items


async def same_as_plain_consumer(
    kafka: LocalKafka, topic: str, partitions: int, count: int, **kwargs: Any
) -> list[Row]:
    """Reads the topic with a tapped consumer and a plain one (while the tapped one is alive);
    checks they agree on every record; returns the records."""
    until = await ends(kafka, topic, partitions)
    async with consumer(kafka, topic, partitions, tapped=True, **kwargs) as tapped:
        got = rows(await drain(tapped, until))
        async with consumer(kafka, topic, partitions, tapped=False) as plain:
            want = reference_rows(await drain(plain, until))
    assert len(got) == count
    assert got == want
    return got


async def send_in_batches(
    producer: AIOKafkaProducer, topic: str, sends: list[dict[str, Any]], per_batch: int
) -> None:
    """Sends `per_batch` at a time, flushing between, so the topic holds several batches."""
    for start in range(0, len(sends), per_batch):
        futures = [await producer.send(topic, **s) for s in sends[start : start + per_batch]]
        await producer.flush()
        await asyncio.gather(*futures)


def test_the_pin_holds_for_the_installed_aiokafka_and_catches_changes() -> None:
    tap.check_pin(aiokafka.__version__, fetcher)  # installed: the factory takes the same names
    before = fetcher.PartitionRecords
    tap.install()
    assert fetcher.PartitionRecords is before  # idempotent
    with pytest.raises(tap.TapError, match=r"0\.15\.0.*sidecar/tap\.py must be re-checked"):
        tap.check_pin("0.15.0", fetcher)

    class Fetcher:  # the fetch code, changed
        def _proc_fetch_request(self, tp: Any, part_data: list[bytes], fetch_offset: int) -> Any:
            records = MemoryRecords(part_data[-1])
            return fetcher.PartitionRecords(tp, records, None, fetch_offset, None, None, 1, 0)

    def partition_records(tp: Any, records: Any, aborted: Any, fetch_offset: int) -> None:
        pass

    def changed(name: str, value: Any) -> Any:
        """aiokafka's fetcher with `name` changed to `value` (None: gone)."""
        names = ("MemoryRecords", "PartitionRecords", "Fetcher", "READ_COMMITTED")
        module = types.SimpleNamespace(**{n: getattr(fetcher, n) for n in names})
        if value is None:
            delattr(module, name)
        else:
            setattr(module, name, value)
        return module

    tap.check_pin(aiokafka.__version__, changed("READ_COMMITTED", 1))
    for name, value, message in [
        ("Fetcher", Fetcher, "no longer calls PartitionRecords"),
        ("PartitionRecords", partition_records, "PartitionRecords takes"),
        ("MemoryRecords", None, "fetcher.MemoryRecords is gone"),
    ]:
        with pytest.raises(tap.TapError, match=message):
            tap.check_pin(aiokafka.__version__, changed(name, value))


def test_transcode_without_the_tap_says_so() -> None:
    with pytest.raises(RuntimeError, match=r"tap\.install\(\)"):
        tap.TRANSCODE(b"key")


def mixed(i: int) -> dict[str, Any]:
    """Null keys, null and empty values, headers (one with a null value), set timestamps."""
    value = None if i % 7 == 0 else b"" if i % 11 == 0 else f"v{i}-".encode() * (i % 13)
    key = None if i % 5 == 0 and value is not None else f"k{i}".encode()
    headers = [] if i % 3 == 0 else [("h", f"{i}".encode()), ("null", None), ("é", b"")]
    timestamp = 1_700_000_000_000 + i if i % 4 == 0 else None
    return {"key": key, "value": value, "headers": headers, "timestamp_ms": timestamp}


async def test_a_tapped_group_consumer_gets_what_a_plain_one_does(
    kafka: LocalKafka, new_topic: TopicFactory, producer: AIOKafkaProducer
) -> None:
    topic = await new_topic(partitions=3)
    sends = [mixed(i) | {"partition": i % 3} for i in range(300)]
    await send_in_batches(producer, topic, sends, per_batch=40)
    got = await same_as_plain_consumer(
        kafka, topic, 3, 300, group_id=f"tap-{uuid.uuid4().hex[:10]}"
    )
    assert {row[1] for row in got} == {0, 1, 2}
    assert {row[7] for row in got} == {pb.TIMESTAMP_TYPE_CREATE_TIME}
    assert any(row[3] is None for row in got)
    assert any(row[4] is None for row in got)
    assert any(row[4] == b"" for row in got)
    assert any(("null", None) in row[5] for row in got)


@pytest.mark.parametrize(
    ("codec", "timestamps"),
    [
        ("gzip", "CreateTime"),
        ("snappy", "CreateTime"),
        ("lz4", "CreateTime"),
        ("zstd", "CreateTime"),
        ("zstd", "LogAppendTime"),
    ],
)
async def test_each_codec(
    kafka: LocalKafka, new_topic: TopicFactory, codec: str, timestamps: str
) -> None:
    topic = await new_topic(partitions=2, config={"message.timestamp.type": timestamps})
    producer = AIOKafkaProducer(bootstrap_servers=kafka.plaintext, compression_type=codec)
    await producer.start()
    try:
        sends = [mixed(i) | {"partition": i % 2} for i in range(120)]
        await send_in_batches(producer, topic, sends, per_batch=30)
    finally:
        await producer.stop()
    got = await same_as_plain_consumer(kafka, topic, 2, 120)
    kind = {"CreateTime": pb.TIMESTAMP_TYPE_CREATE_TIME}.get(timestamps)
    assert {row[7] for row in got} == {kind or pb.TIMESTAMP_TYPE_LOG_APPEND_TIME}


async def test_transactions(
    kafka: LocalKafka, new_topic: TopicFactory, producer: AIOKafkaProducer
) -> None:
    topic = await new_topic(partitions=2)
    txp = AIOKafkaProducer(bootstrap_servers=kafka.plaintext, transactional_id=f"tx-{topic}")
    await txp.start()
    committed: list[bytes] = []
    aborted: list[bytes] = []
    try:
        for n, commit in enumerate([True, False, True, False, False, True, False]):
            plain = f"plain-{n}".encode()  # not transactional: visible under both levels
            await producer.send_and_wait(topic, plain, partition=n % 2)
            committed.append(plain)
            await txp.begin_transaction()
            values = [f"{n}-{i}".encode() for i in range(12)]
            futures = [await txp.send(topic, v, partition=i % 2) for i, v in enumerate(values)]
            await txp.flush()
            await asyncio.gather(*futures)
            await (txp.commit_transaction() if commit else txp.abort_transaction())
            (committed if commit else aborted).extend(values)
    finally:
        await txp.stop()
    until = await ends(kafka, topic, 2)
    for level, want in [
        ("read_committed", committed),
        ("read_uncommitted", committed + aborted),
    ]:
        async with consumer(kafka, topic, 2, tapped=True, isolation_level=level) as c:
            got = rows(await drain(c, until))
            # Each partition ends with a transaction marker, which moved the position too.
            for tp, end in until.items():
                assert await c.position(tp) == end
                assert max(r[2] for r in got if r[1] == tp.partition) < end - 1
        assert sorted(r[4] or b"" for r in got) == sorted(want), level


async def test_pause_resume_and_seek(
    kafka: LocalKafka, new_topic: TopicFactory, producer: AIOKafkaProducer
) -> None:
    topic = await new_topic(partitions=1)
    tp = TopicPartition(topic, 0)
    sends = [{"key": f"k{i}".encode(), "value": f"v{i}".encode()} for i in range(100)]
    await send_in_batches(producer, topic, sends, per_batch=25)
    async with consumer(kafka, topic, 1, tapped=True) as c:
        c.pause(tp)
        assert await c.getmany(timeout_ms=1000) == {}
        c.resume(tp)
        assert [r[2] for r in rows(await drain(c, {tp: 100}))] == list(range(100))

        c.seek(tp, 37)  # mid-batch: the records before it are skipped
        items: list[Any] = []
        async with asyncio.timeout(60):
            while await c.position(tp) < 100:
                got = await c.getmany(timeout_ms=500, max_records=1)
                assert sum(map(len, got.values())) <= 1  # a whole fetch counts as one
                items.extend(*got.values())
        assert items[0].offsets[0] == 37
        assert [r[2] for r in rows(items)] == list(range(37, 100))

        c.seek(tp, 99)
        last = await c.getone()
        assert isinstance(last, Transcoded)
        assert last.offsets == [99]


def batch(base_offset: int, count: int) -> bytes:
    """A v2 batch as a broker stores it (the base offset is outside the CRC)."""
    builder = DefaultRecordBatchBuilder(2, 0, 0, -1, 0, 0, 1 << 20)
    for i in range(count):
        builder.append(i, 1_700_000_000_000 + i, f"k{base_offset + i}".encode(), b"value", [])
    buf = bytearray(builder.build())
    struct.pack_into(">q", buf, 0, base_offset)
    return bytes(buf)


async def test_a_corrupt_batch_is_an_item_not_an_exception() -> None:
    first, second, third = batch(0, 3), batch(3, 3), batch(6, 2)
    damaged = bytearray(first + second + third)
    damaged[len(first) + 70] ^= 0x01  # inside the second batch's records: its CRC fails
    data = bytes(damaged)
    tp = TopicPartition("orders", 4)

    def transcoding(fetch_offset: int, payload: bytes = data) -> tap.Transcoding:
        return tap.Transcoding(
            tp, payload, fetch_offset=fetch_offset, aborted=None, check_crcs=True
        )

    t = transcoding(0)
    assert t.next_fetch_offset == 0
    partial, corrupt = list(t)
    assert isinstance(partial, Transcoded)
    assert partial.offsets == [0, 1, 2]
    assert isinstance(corrupt, tap.Corrupt)
    assert (corrupt.tp, corrupt.offset) == (("orders", 4), 3)
    assert isinstance(corrupt.error, CorruptRecordError)
    assert t.next_fetch_offset == 3  # fetched again from the bad batch

    # Fetched again there (the first batch's records are below the position): only the error.
    t = transcoding(3)
    assert [(c.tp, c.offset) for c in t if isinstance(c, tap.Corrupt)] == [(("orders", 4), 3)]
    assert t.next_fetch_offset == 3

    # Not even bytes: still an item.
    t = transcoding(5, cast(bytes, None))
    (odd,) = list(t)
    assert isinstance(odd, tap.Corrupt)
    assert odd.offset == 5
    assert t.next_fetch_offset == 5

    # Through aiokafka's FetchResult: both items come out and the position stays at the bad
    # batch, so the partition is fetched there again.
    subscriptions = SubscriptionState()
    subscriptions.assign_from_user({tp})
    assignment = subscriptions.subscription.assignment
    assignment.state_value(tp).seek(0)
    result = FetchResult(tp, assignment=assignment, partition_records=transcoding(0), backoff=0)
    assert [type(item) for item in result.getall()] == [Transcoded, tap.Corrupt]
    assert assignment.state_value(tp).position == 3
    assert not result.has_more()


def test_health_names_partitions_stuck_at_an_unreadable_batch_until_they_read_again() -> None:
    """The fetcher's bookkeeping for health (sidecar/consumer.py `Unreadable`): a `Corrupt`
    makes a fault naming the partition, offset and cause; a good fetch of it, or losing it,
    clears it."""
    a, b = ("t", 0), ("t", 1)
    bad = tap.Corrupt(a, 42, CorruptRecordError("Invalid CRC", Transcoded(b"", [], [], [], 42, 0)))
    good = Transcoded(b"", [], [], [], 50, 1)
    unreadable = Unreadable()
    assert unreadable.fault is None
    assert unreadable.update({a: [bad], b: [good]}, {a, b})
    fault = unreadable.fault or ""
    assert fault.startswith("record batches cannot be read: t[0]@42 (")
    assert "Invalid CRC" in fault
    assert not unreadable.update({a: [bad]}, {a, b})  # still stuck: no news
    assert not unreadable.update({b: [good]}, {a, b})  # another partition reads: no news
    assert unreadable.update({a: [good]}, {a, b})  # repaired, or reset past it
    assert unreadable.fault is None
    assert unreadable.update({a: [bad]}, {a, b})
    assert unreadable.update({}, {b})  # revoked: its next owner reports it
    assert unreadable.fault is None
