"""The integration tests' common opening, in one place.

Most end-to-end tests start the same way: make a topic, produce N keyed records, start a real
`kafka-sidecar run` with a subscription for it, open a gRPC channel, send `open`, read
`opened`. `consuming(...)` does all of that and hands back a `Consuming`: the topic, group,
sidecar process, channel, stub and the opened stream, plus the helpers the tests kept
re-writing (produce more, read batches, ack, Kafka's own view of committed vs end offsets).
Everything it made is torn down on exit (streams, channel, sidecar, producer, topics).

    async with consuming(kafka, "receipts", partitions=4, records=1000) as c:
        records = await c.receive(1000)          # reads batches, acks each one
        await c.wait_committed()                 # the group's commits reach the end offsets
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kafkasidecar.v1 import consumer_pb2 as pb
from kafkasidecar.v1 import consumer_pb2_grpc as pb_grpc
from tests.localkafka import LocalKafka, committed_offsets, end_offsets
from tests.sidecarproc import AppStream, SidecarProcess, group_subscription

#: (partition, offset) -> value, for what a test produced.
Produced = dict[tuple[int, int], bytes]
Offsets = dict[tuple[str, int], int]


async def produce(
    producer: AIOKafkaProducer, topic: str, count: int, *, size: int = 100, partitions: int = 1
) -> Produced:
    """`count` keyed records (key `k<i>`, value `<i:08d>` padded to `size` bytes), round-robin
    over partitions; returns (partition, offset) -> value."""
    futures = []
    values = []
    for i in range(count):
        value = f"{i:08d}".encode().ljust(size, b".")
        values.append(value)
        futures.append(
            await producer.send(topic, value, key=f"k{i}".encode(), partition=i % partitions)
        )
    metas = await asyncio.gather(*futures)
    return {(m.partition, m.offset): v for m, v in zip(metas, values, strict=True)}


async def wait_committed(kafka: LocalKafka, group_id: str, topic: str, timeout: float = 60) -> None:
    """Until Kafka itself says the group committed every partition of `topic` up to its end
    offset (admin OffsetFetch vs the partitions' end offsets)."""
    ends = await end_offsets(kafka, topic)
    committed: Offsets = {}
    try:
        async with asyncio.timeout(timeout):
            while (committed := await committed_offsets(kafka, group_id)) != ends:
                await asyncio.sleep(0.2)
    except TimeoutError:
        raise AssertionError(
            f"after {timeout:g}s the group {group_id!r} committed {committed}, "
            f"not the end offsets {ends}"
        ) from None


async def read_all(
    kafka: LocalKafka,
    topic: str,
    timeout: float = 60,
    isolation_level: str = "read_uncommitted",
) -> list[Any]:
    """Every record of `topic` up to its current end offsets, all partitions, with no group.
    (read_committed: the position passes the end once the last transaction's marker is read,
    so the loop waits for positions, not record counts.)"""
    ends = {tp: end for (_t, tp), end in (await end_offsets(kafka, topic)).items() if end}
    records: list[Any] = []
    if not ends:
        return records
    consumer = AIOKafkaConsumer(
        bootstrap_servers=kafka.plaintext,
        enable_auto_commit=False,
        isolation_level=isolation_level,
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in ends]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        async with asyncio.timeout(timeout):
            while [tp for tp in tps if await consumer.position(tp) < ends[tp.partition]]:
                for batch in (await consumer.getmany(*tps, timeout_ms=500)).values():
                    records.extend(batch)
    finally:
        await consumer.stop()
    return records


async def stream_error(
    address: str,
    *requests: pb.ConsumeRequest,
    metadata: Sequence[tuple[str, str]] = (),
    timeout: float = 60,
) -> grpc.aio.AioRpcError:
    """Sends `requests` on a fresh stream and returns the error the sidecar ends it with.

    Fails if the stream stays open past `timeout` or ends cleanly."""
    async with grpc.aio.insecure_channel(address) as channel:
        app = AppStream(channel, metadata=list(metadata))
        for request in requests:
            app.send(request)
        try:
            while True:
                await app.next(timeout=timeout)
        except grpc.aio.AioRpcError as failure:
            # Shown when an assertion on the code fails: what the server said.
            print(f"stream_error: {failure.code()} {failure.details()!r}")
            return failure
        except AssertionError as ended:  # AppStream.next: "stream ended"
            raise AssertionError(f"the stream ended with OK after {requests}") from ended
        except TimeoutError:
            raise AssertionError(f"the stream stayed open after {requests}") from None


async def health_status(address: str, service: str = "") -> int:
    """grpc.health.v1 Check for `service` ("" = the whole sidecar)."""
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
        return int(reply.status)


SERVING = int(health_pb2.HealthCheckResponse.SERVING)


@dataclass(eq=False)
class Consuming:
    """A topic with records, a sidecar subscribed to it, and an app stream opened on it."""

    kafka: LocalKafka
    producer: AIOKafkaProducer
    topic: str
    partitions: int
    #: The subscription's config (its name, group_id, and the overrides given).
    subscription: dict[str, Any]
    sidecar: SidecarProcess
    channel: grpc.aio.Channel
    stub: pb_grpc.ConsumerServiceStub
    #: Request metadata (the bearer token when the sidecar has one).
    metadata: list[tuple[str, str]]
    #: The dead-letter topic, when asked for.
    dlq: str | None = None
    #: Everything produced through this object, (partition, offset) -> value.
    produced: Produced = field(default_factory=dict)
    #: The opened stream and what `opened` said (None with `open=False`).
    stream: AppStream | None = None
    opened_reply: pb.Opened | None = None
    #: Every stream made through this object: closed on exit.
    streams: list[AppStream] = field(default_factory=list)

    @property
    def name(self) -> str:
        return str(self.subscription["name"])

    @property
    def group_id(self) -> str:
        return str(self.subscription["group_id"])

    @property
    def app(self) -> AppStream:
        """The opened stream (fails with `open=False`)."""
        assert self.stream is not None, "consuming(..., open=False): no stream was opened"
        return self.stream

    @property
    def opened(self) -> pb.Opened:
        """What the sidecar answered to the opened stream's `open`."""
        assert self.opened_reply is not None, "consuming(..., open=False): no stream was opened"
        return self.opened_reply

    # -- records in ----------------------------------------------------------------------

    async def produce(self, count: int, *, size: int = 100) -> Produced:
        """`count` more keyed records, round-robin over the topic's partitions."""
        made = await produce(
            self.producer, self.topic, count, size=size, partitions=self.partitions
        )
        self.produced.update(made)
        return made

    # -- streams -------------------------------------------------------------------------

    def new_stream(self, *, keep: bool = True) -> AppStream:
        """A second (third, ...) stream on the channel, not yet opened; closed on exit."""
        stream = AppStream(self.channel, metadata=self.metadata or None, keep=keep)
        self.streams.append(stream)
        return stream

    async def open_stream(
        self,
        max_outstanding_batches: int = 0,
        max_outstanding_records: int = 0,
        max_outstanding_bytes: int = 0,
    ) -> AppStream:
        """Another stream on the subscription, `opened` already read."""
        stream = self.new_stream()
        await stream.open(
            self.name, max_outstanding_batches, max_outstanding_records, max_outstanding_bytes
        )
        return stream

    async def batch(self, stream: AppStream | None = None, timeout: float = 60) -> pb.Batch:
        """The next batch on `stream` (default: the opened one), skipping other responses."""
        return (await (stream or self.app).next("batch", timeout=timeout)).batch

    def ack(self, *batches: pb.Batch, stream: AppStream | None = None) -> None:
        """Acks whole batches by id."""
        (stream or self.app).ack(batch_ids=[b.batch_id for b in batches])

    async def receive(
        self, count: int, *, stream: AppStream | None = None, ack: bool = True, timeout: float = 60
    ) -> list[pb.Record]:
        """Reads batches until `count` records came (acking each batch unless `ack=False`)."""
        records: list[pb.Record] = []
        async with asyncio.timeout(timeout):
            while len(records) < count:
                batch = await self.batch(stream)
                records.extend(batch.records)
                if ack:
                    self.ack(batch, stream=stream)
        return records

    # -- Kafka's own view ----------------------------------------------------------------

    async def committed(self) -> Offsets:
        return await committed_offsets(self.kafka, self.group_id)

    async def end_offsets(self, topic: str | None = None) -> Offsets:
        return await end_offsets(self.kafka, topic or self.topic)

    async def wait_committed(self, timeout: float = 60) -> None:
        """Until the group's committed offsets equal the topic's end offsets."""
        await wait_committed(self.kafka, self.group_id, self.topic, timeout)

    async def health(self, service: str = "") -> int:
        return await health_status(self.sidecar.address, service)


def _warnings(log: str) -> list[str]:
    """Warning-and-up JSON lines, and anything not JSON (tracebacks, Python's own errors),
    shortened: the start of the line and the end of its traceback, if any."""
    shown = []
    for line in log.splitlines():
        if _level(line) < 30:
            continue
        try:
            exc = str(json.loads(line).get("exc", ""))
        except (ValueError, AttributeError):
            exc = ""
        shown.append(line[:400] + (f" ... {exc[-400:]!r}" if exc else ""))
    return shown


def _level(line: str) -> int:
    try:
        entry = json.loads(line)
    except ValueError:
        return 40
    if not isinstance(entry, dict):
        return 40
    level = str(entry.get("level", "info")).upper()
    return {"DEBUG": 10, "INFO": 20, "WARNING": 30, "ERROR": 40, "CRITICAL": 50}.get(level, 20)


def _test_prefix() -> str:
    """The running test's name, shortened: topic names say which test made them."""
    current = os.environ.get("PYTEST_CURRENT_TEST", "test").split("::")[-1]
    return current.split(" ")[0].split("[")[0].replace("_", "-")[:40]


@contextlib.asynccontextmanager
async def consuming(
    kafka: LocalKafka,
    name: str = "app",
    *,
    partitions: int = 1,
    records: int = 0,
    size: int = 100,
    prepare: Callable[[Consuming], Awaitable[object]] | None = None,
    dead_letter: bool = False,
    listener: str = "plaintext",
    auth_token: str | None = None,
    sidecar_options: dict[str, Any] | None = None,
    open: bool = True,
    max_outstanding_batches: int = 0,
    max_outstanding_records: int = 0,
    max_outstanding_bytes: int = 0,
    **overrides: Any,
) -> AsyncIterator[Consuming]:
    """Topic (`partitions`), `records` keyed records, a sidecar with subscription `name`
    (group_subscription defaults, `overrides` on top, e.g. `batch={...}`, `ordering="none"`),
    a channel and, unless `open=False`, a stream opened with the given window.

    `prepare(c)` runs after the topic exists and before the sidecar starts (to produce
    special records). `dead_letter=True` makes a DLQ topic too (`c.dlq`).
    `sidecar_options` go to SidecarProcess (tcp=, metrics=, listen=, extra=, env=).
    """
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.plaintext)
    await admin.start()
    producer = AIOKafkaProducer(bootstrap_servers=kafka.plaintext, acks="all", linger_ms=5)
    made: list[str] = []
    sidecar: SidecarProcess | None = None

    async def new_topic(partitions: int) -> str:
        topic = f"{_test_prefix()}-{uuid.uuid4().hex[:10]}"
        await admin.create_topics(
            [NewTopic(topic, num_partitions=partitions, replication_factor=1)]
        )
        made.append(topic)
        return topic

    try:
        await producer.start()
        topic = await new_topic(partitions)
        dlq = await new_topic(1) if dead_letter else None
        if dlq is not None:
            overrides.setdefault("dead_letter", {"topic": dlq})
        subscription = group_subscription(name, topic, **overrides)
        sidecar = SidecarProcess(
            kafka,
            [subscription],
            listener=listener,
            auth_token=auth_token,
            **(sidecar_options or {}),
        )
        metadata = [("authorization", f"Bearer {auth_token}")] if auth_token else []
        async with grpc.aio.insecure_channel(sidecar.address) as channel:
            c = Consuming(
                kafka=kafka,
                producer=producer,
                topic=topic,
                partitions=partitions,
                subscription=subscription,
                sidecar=sidecar,
                channel=channel,
                stub=pb_grpc.ConsumerServiceStub(channel),
                metadata=metadata,
                dlq=dlq,
            )
            if records:
                await c.produce(records, size=size)
            if prepare is not None:
                await prepare(c)
            sidecar.start()
            await sidecar.wait_serving()
            if open:
                c.stream = c.new_stream()
                c.opened_reply = await c.stream.open(
                    name, max_outstanding_batches, max_outstanding_records, max_outstanding_bytes
                )
            try:
                yield c
            except BaseException:
                # Shown with the failure: what the sidecar said, warnings and up.
                print(f"---- sidecar log ({sidecar.log_path}), warnings and errors, last 20:")
                print("\n".join(_warnings(sidecar.logs())[-20:]))
                raise
            finally:
                # Half-close what is still open; the channel's close then ends every stream,
                # so the sidecar's shutdown has nothing unsettled to wait for.
                for stream in c.streams:
                    stream.close()
    finally:
        if sidecar is not None:
            await asyncio.to_thread(sidecar.stop)
        await producer.stop()
        if made:
            with contextlib.suppress(Exception):
                await admin.delete_topics(made)
        await admin.close()
