"""Throughput, CPU, added latency and memory: a plain in-process aiokafka consumer vs the same
records through kafka-sidecar, side by side in one run.

For each configuration (ordering x listener x compression) it reports:

1. records/s of (a) an in-process AIOKafkaConsumer (getmany, touching each value) and (b) a
   real `kafka-sidecar run` process delivering the same records over gRPC (Unix socket) to a
   Python app that touches each value and acks each batch, timed until the group's commits
   reach the end offsets; and the ratio b/a.
2. CPU microseconds per record (utime+stime) of the in-process consumer, of the gRPC app and
   of the sidecar process (and of the broker, which shares the cores).
3. Added latency p50/p99 (produce timestamp -> receipt, sidecar path minus in-process path),
   with a paced producer in its own process at half of (b)'s rate.
4. The sidecar's peak RSS, and its RSS with a slow app and a backlog of 30k vs 300k records
   (memory should be bounded by the flow-control window, not the backlog: flat within 10%).
5. With `--outputs plain|transactions`: (c) the same as (b), except that the app acks each
   batch with one output per record (same key and 1 KiB value, to a topic of its own), written
   idempotently or in per-partition transactions with the commits; and the ratio c/b.

Prints one JSON line per configuration as it finishes and a markdown table at the end (stdout);
progress goes to stderr. `--matrix` runs ordering none|partition x plaintext|iam x
none|lz4|zstd. Compressed runs need aiokafka's codec package (cramjam, from the
aiokafka[lz4,snappy,zstd] dependency) in the environment of both the bench and the sidecar;
without it a single run refuses that compression and the matrix marks its rows skipped.

    .venv/bin/python bench/throughput.py [--records 200000] [--ordering none|partition]
        [--listener plaintext|iam] [--compression none|gzip|snappy|lz4|zstd]
        [--skip-latency] [--skip-rss] [--matrix] [--outputs plain|transactions]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import multiprocessing
import os
import resource
import shutil
import statistics
import struct
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka import codec as kafka_codec
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kafkasidecar.v1 import consumer_pb2 as pb
from tests.localkafka import LocalKafka, committed_offsets, end_offsets
from tests.sidecarproc import AppStream, SidecarProcess, group_subscription

PARTITIONS = 8
VALUE_BYTES = 1024
# Sidecar settings for every phase (the batching bounds the added latency).
BATCH = {"max_records": 500, "max_bytes": 1048576, "max_wait_ms": 50}
WINDOW = {"max_outstanding_batches": 8, "max_outstanding_records": 8000}
COMMIT_INTERVAL_MS = 500
CLK_TCK = os.sysconf("SC_CLK_TCK")
CODECS: dict[str, Callable[[], bool]] = {
    "none": lambda: True,
    "gzip": kafka_codec.has_gzip,
    "snappy": kafka_codec.has_snappy,
    "lz4": kafka_codec.has_lz4,
    "zstd": kafka_codec.has_zstd,
}
# aiokafka's extras snappy, lz4 and zstd all install this one package.
CODEC_PACKAGE = "cramjam"
STAMP = struct.Struct(">q")  # produce time (time.time_ns) in the first 8 bytes of a value


def values() -> list[bytes]:
    """1 KiB values of hex text: distinct within a producer batch and about 2:1 compressible,
    so compressed runs are not flattered by repeated bytes."""
    return [os.urandom(VALUE_BYTES // 2).hex().encode() for _ in range(1024)]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- /proc accounting ------------------------------------------------------------------------


def self_cpu() -> float:
    """CPU seconds (user+system, all threads) of this process: the app and the in-process
    consumer. Children (the paced producer) are not included."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def proc_cpu(pid: int | None) -> float:
    """CPU seconds (utime+stime from /proc/PID/stat) of another process, 0 if unknown."""
    if pid is None:
        return 0.0
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()  # fields[0] is field 3 (state)
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def vm_kib(pid: int, key: str) -> int:
    """VmRSS / VmHWM of a process in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def broker_pid() -> int | None:
    """The local broker's pid (scripts/local-kafka's pid file), to show what it costs too."""
    home = os.environ.get("LOCAL_KAFKA_HOME") or str(
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        / "kafka-sidecar"
        / "local-kafka"
    )
    try:
        pid = int((Path(home) / "broker.pid").read_text().strip())
        if b"kafka.Kafka" in Path(f"/proc/{pid}/cmdline").read_bytes():
            return pid
    except (OSError, ValueError):
        pass
    return None


class Meter:
    """Wall time and CPU of this process, the sidecar and the broker over one phase."""

    def __init__(self, sidecar_pid: int | None = None) -> None:
        self.sidecar_pid = sidecar_pid
        self.broker_pid = broker_pid()
        self.wall = time.perf_counter()
        self.self_cpu = self_cpu()
        self.sidecar_cpu = proc_cpu(sidecar_pid)
        self.broker_cpu = proc_cpu(self.broker_pid)

    def elapsed(self) -> float:
        return time.perf_counter() - self.wall

    def self_used(self) -> float:
        return self_cpu() - self.self_cpu

    def sidecar_used(self) -> float:
        return proc_cpu(self.sidecar_pid) - self.sidecar_cpu

    def broker_used(self) -> float | None:
        if self.broker_pid is None:
            return None
        return proc_cpu(self.broker_pid) - self.broker_cpu


def us_per(seconds: float, records: int) -> float:
    return round(seconds * 1e6 / records, 1)


def broker_us_per(seconds: float | None, records: int) -> float | None:
    return None if seconds is None else us_per(seconds, records)


# --- topics and producing --------------------------------------------------------------------


class Topics:
    """Creates the bench's topics and deletes them all at the end; produced topics are reused
    across configurations with the same compression."""

    def __init__(self, kafka: LocalKafka) -> None:
        self.kafka = kafka
        self.created: list[str] = []
        self._filled: dict[tuple[str, str, int], str] = {}
        self._values = values()

    async def create(self, kind: str) -> str:
        topic = f"bench-{kind}-{uuid.uuid4().hex[:8]}"
        admin = AIOKafkaAdminClient(bootstrap_servers=self.kafka.plaintext)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(topic, PARTITIONS, 1)])
            async with asyncio.timeout(30):  # every partition has a leader: no retries later
                while not await self._ready(admin, topic):
                    await asyncio.sleep(0.1)
        finally:
            await admin.close()
        self.created.append(topic)
        return topic

    @staticmethod
    async def _ready(admin: AIOKafkaAdminClient, topic: str) -> bool:
        described = await admin.describe_topics([topic])
        partitions = described[0]["partitions"] if described else []
        return len(partitions) == PARTITIONS and all(
            p["error_code"] == 0 and p["leader"] >= 0 for p in partitions
        )

    async def filled(self, kind: str, count: int, compression: str) -> str:
        """A topic holding `count` records produced with `compression` (made once)."""
        key = (kind, compression, count)
        if key not in self._filled:
            topic = await self.create(kind)
            await self.produce(topic, count, compression)
            self._filled[key] = topic
        return self._filled[key]

    async def produce(self, topic: str, count: int, compression: str) -> None:
        producer = new_producer(self.kafka.plaintext, compression)
        await producer.start()
        started = time.perf_counter()
        try:
            pool = self._values
            sent = batches = 0
            delivered = []
            while sent < count:
                batch = producer.create_batch()
                while sent < count and append(batch, pool[sent % len(pool)]):
                    sent += 1
                partition = batches % PARTITIONS
                delivered.append(await producer.send_batch(batch, topic, partition=partition))
                batches += 1
                if sent // 100_000 > (sent - batch.record_count()) // 100_000:
                    log(f"  produced {sent:,}")
            await asyncio.gather(*delivered)
        finally:
            await producer.stop()
        log(
            f"produced {count:,} x 1 KiB ({compression}) to {topic} "
            f"in {time.perf_counter() - started:.1f}s"
        )

    async def delete_all(self) -> None:
        if not self.created:
            return
        admin = AIOKafkaAdminClient(bootstrap_servers=self.kafka.plaintext)
        await admin.start()
        try:
            await admin.delete_topics(self.created)
        finally:
            await admin.close()


def new_producer(bootstrap: str, compression: str) -> AIOKafkaProducer:
    """A producer for whole batches (`create_batch`/`send_batch`): far less CPU per record
    than `send`, which matters when it shares the cores with what it measures."""
    return AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks=1,
        max_batch_size=512 * 1024,
        compression_type=None if compression == "none" else compression,
    )


def append(batch: Any, value: bytes) -> bool:
    """Adds a record to a BatchBuilder; False when the batch is full."""
    return batch.append(key=None, value=value, timestamp=None) is not None


def paced_producer(bootstrap: str, topic: str, count: int, rate: float, compression: str) -> None:
    """Child process: `count` records at `rate` records/s, each stamped with its produce time
    (time.time_ns) in the first 8 bytes of its value. Every 2 ms it sends what is due as one
    batch, to the partitions in turn."""

    async def run() -> None:
        producer = new_producer(bootstrap, compression)
        await producer.start()
        pool = [value[STAMP.size :] for value in values()]
        started = time.monotonic()
        sent = batches = 0
        delivered = []
        try:
            while sent < count:
                due = min(count, int((time.monotonic() - started) * rate) + 1)
                if sent < due:
                    batch = producer.create_batch()
                    while sent < due and append(
                        batch, STAMP.pack(time.time_ns()) + pool[sent % len(pool)]
                    ):
                        sent += 1
                    partition = batches % PARTITIONS
                    delivered.append(await producer.send_batch(batch, topic, partition=partition))
                    batches += 1
                if sent >= due:
                    await asyncio.sleep(0.002)
            await asyncio.gather(*delivered)
        finally:
            await producer.stop()

    asyncio.run(run())


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class Pacing:
    """The paced producer in its own process (so it does not share the receiver's event loop)
    for the duration of an `async with` block, which waits for it at the end. `cpu` is its
    CPU seconds (getrusage of the children reaped meanwhile: only this one)."""

    def __init__(
        self, kafka: LocalKafka, topic: str, count: int, rate: float, compression: str
    ) -> None:
        self.process = multiprocessing.get_context("spawn").Process(
            target=paced_producer, args=(kafka.plaintext, topic, count, rate, compression)
        )
        self.cpu = 0.0

    async def __aenter__(self) -> Pacing:
        self._children_cpu = children_cpu()
        self.process.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.process.join, 60)
        if self.process.exitcode is None:
            self.process.kill()
            await asyncio.to_thread(self.process.join)
        self.cpu = children_cpu() - self._children_cpu
        self.check(finished=True)

    def check(self, finished: bool = False) -> None:
        """Raises at once if the producer died (instead of waiting for its records)."""
        if self.process.exitcode not in ((0,) if finished else (None, 0)):
            raise RuntimeError(f"paced producer exited with {self.process.exitcode}")


@dataclass
class Latencies:
    """receipt - produce time per record, in ns, after the first second (warm-up)."""

    samples: list[tuple[int, int]] = field(default_factory=list)  # (produced ns, latency ns)
    producer_cpu: float = 0.0  # the paced producer's CPU seconds

    def add(self, received_ns: int, value: bytes) -> None:
        (produced,) = STAMP.unpack_from(value)
        self.samples.append((produced, received_ns - produced))

    def steady(self) -> list[int]:
        first = min(produced for produced, _ in self.samples)
        return [lat for produced, lat in self.samples if produced >= first + 1_000_000_000]

    def achieved_rate(self) -> float:
        stamps = [produced for produced, _ in self.samples]
        span = (max(stamps) - min(stamps)) / 1e9
        return len(stamps) / span if span > 0 else 0.0

    def percentiles_ms(self) -> tuple[float, float]:
        cuts = statistics.quantiles(self.steady(), n=100, method="inclusive")
        return cuts[49] / 1e6, cuts[98] / 1e6


# --- the two paths ---------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def in_process_consumer(kafka: LocalKafka, listener: str, topic: str) -> AsyncIterator[Any]:
    consumer = AIOKafkaConsumer(**kafka.client_kwargs(listener, enable_auto_commit=False))
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        yield consumer
    finally:
        await consumer.stop()


@contextlib.asynccontextmanager
async def running_sidecar(
    kafka: LocalKafka,
    topic: str,
    listener: str,
    ordering: str,
    max_wait_ms: int = BATCH["max_wait_ms"],
    transactions: bool = False,
) -> AsyncIterator[tuple[SidecarProcess, dict[str, Any], AppStream]]:
    """A `kafka-sidecar run` process with one subscription ("bench") on `topic`, serving, and
    an app stream opened on it."""
    sub = group_subscription(
        "bench",
        topic,
        batch={**BATCH, "max_wait_ms": max_wait_ms},
        ordering=ordering,
        window=WINDOW,
        commit_interval_ms=COMMIT_INTERVAL_MS,
        transactions={"enabled": transactions, "transactional_id_prefix": "bench"},
    )
    sidecar = SidecarProcess(kafka, [sub], listener=listener, extra={"shutdown_grace_ms": 2000})
    sidecar.config_path.write_text(sidecar.config_path.read_text().replace("DEBUG", "INFO"))
    sidecar.start()
    try:
        await sidecar.wait_serving()
        async with grpc.aio.insecure_channel(sidecar.address) as channel:
            app = AppStream(channel, keep=False)
            try:
                await app.open("bench")
                yield sidecar, sub, app
            finally:
                app.close()
    finally:
        sidecar.stop()
        shutil.rmtree(sidecar.dir, ignore_errors=True)


def sidecar_pid(sidecar: SidecarProcess) -> int:
    assert sidecar.proc is not None
    return sidecar.proc.pid


def touch(value: bytes) -> int:
    """What every consumer here does with a record: read its value."""
    return value[0] + value[-1]


async def throughput_in_process(
    kafka: LocalKafka, listener: str, topic: str, count: int
) -> dict[str, Any]:
    async with in_process_consumer(kafka, listener, topic) as consumer:
        meter = Meter()
        seen = touched = 0
        while seen < count:
            batches = await consumer.getmany(timeout_ms=500, max_records=5000)
            for records in batches.values():
                seen += len(records)
                for record in records:
                    touched += touch(record.value)
        elapsed = meter.elapsed()
        return {
            "a_records_per_s": round(count / elapsed),
            "a_cpu_us_per_record": us_per(meter.self_used(), count),
            "a_broker_cpu_us_per_record": broker_us_per(meter.broker_used(), count),
        }


async def throughput_sidecar(
    kafka: LocalKafka,
    listener: str,
    ordering: str,
    topic: str,
    count: int,
    outputs: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """`outputs`: (mode, topic): each batch is acked with one output per record, written
    idempotently (`plain`) or in transactions (`transactions`)."""
    ends = await end_offsets(kafka, topic)
    transactional = outputs is not None and outputs[0] == "transactions"
    async with running_sidecar(kafka, topic, listener, ordering, transactions=transactional) as (
        sidecar,
        sub,
        app,
    ):
        meter = Meter(sidecar_pid(sidecar))
        seen = touched = 0
        while seen < count:
            response = await app.next()
            if response.WhichOneof("kind") == "batch":
                batch = response.batch
                for record in batch.records:
                    touched += touch(record.value)
                seen += len(batch.records)
                ack = pb.Ack(batch_ids=[batch.batch_id])
                if outputs is not None:
                    ack.outputs.extend(
                        pb.OutputRecord(topic=outputs[1], key=r.key, value=r.value)
                        for r in batch.records
                    )
                app.send(pb.ConsumeRequest(ack=ack))
        app_cpu = meter.self_used()
        while (await committed_offsets(kafka, sub["group_id"])) != ends:
            await asyncio.sleep(0.05)
        elapsed = meter.elapsed()
        return {
            "b_records_per_s": round(count / elapsed),
            "app_cpu_us_per_record": us_per(app_cpu, count),
            "sidecar_cpu_us_per_record": us_per(meter.sidecar_used(), count),
            "b_broker_cpu_us_per_record": broker_us_per(meter.broker_used(), count),
            "sidecar_peak_rss_mib": round(vm_kib(sidecar_pid(sidecar), "VmHWM") / 1024, 1),
        }


async def latency_in_process(
    kafka: LocalKafka, topics: Topics, listener: str, compression: str, count: int, rate: float
) -> Latencies:
    topic = await topics.create("lat-a")
    latencies = Latencies()
    async with in_process_consumer(kafka, listener, topic) as consumer:
        await consumer.getmany(timeout_ms=200)  # fetching before the first record is produced
        async with (
            Pacing(kafka, topic, count, rate, compression) as producer,
            asyncio.timeout(120 + count / rate),
        ):
            while len(latencies.samples) < count:
                producer.check()
                batches = await consumer.getmany(timeout_ms=500, max_records=5000)
                received = time.time_ns()
                for records in batches.values():
                    for record in records:
                        latencies.add(received, record.value)
        latencies.producer_cpu = producer.cpu
    return latencies


async def latency_sidecar(
    kafka: LocalKafka,
    topics: Topics,
    listener: str,
    ordering: str,
    compression: str,
    count: int,
    rate: float,
    max_wait_ms: int,
) -> Latencies:
    topic = await topics.create("lat-b")
    latencies = Latencies()
    async with (
        running_sidecar(kafka, topic, listener, ordering, max_wait_ms) as (_, _, app),
        Pacing(kafka, topic, count, rate, compression) as producer,
        asyncio.timeout(120 + count / rate),
    ):
        while len(latencies.samples) < count:
            producer.check()
            response = await app.next()
            if response.WhichOneof("kind") == "batch":
                received = time.time_ns()
                for record in response.batch.records:
                    latencies.add(received, record.value)
                app.send(pb.ConsumeRequest(ack=pb.Ack(batch_ids=[response.batch.batch_id])))
    latencies.producer_cpu = producer.cpu
    return latencies


async def rss_with_slow_app(
    kafka: LocalKafka,
    listener: str,
    ordering: str,
    topic: str,
    seconds: float,
    ack_interval: float,
) -> dict[str, Any]:
    """A fresh sidecar with a backlog waiting and an app that acks one batch per
    `ack_interval` seconds: the largest VmRSS sampled over `seconds`, and VmHWM."""
    async with running_sidecar(kafka, topic, listener, ordering) as (sidecar, _, app):
        pid = sidecar_pid(sidecar)
        received = 0
        first = asyncio.Event()

        async def slow_app() -> None:
            nonlocal received
            while True:
                response = await app.next()
                if response.WhichOneof("kind") == "batch":
                    received += len(response.batch.records)
                    first.set()
                    await asyncio.sleep(ack_interval)
                    app.send(pb.ConsumeRequest(ack=pb.Ack(batch_ids=[response.batch.batch_id])))

        task = asyncio.create_task(slow_app())
        try:
            await asyncio.wait_for(first.wait(), 60)
            peak = 0
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                peak = max(peak, vm_kib(pid, "VmRSS"))
                await asyncio.sleep(0.25)
            return {"rss_kib": peak, "hwm_kib": vm_kib(pid, "VmHWM"), "received": received}
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


# --- one configuration -----------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    ordering: str
    listener: str
    compression: str


@dataclass(frozen=True)
class Options:
    records: int
    latency_seconds: float
    rss_backlog: int
    rss_seconds: float
    rss_ack_interval: float
    skip_latency: bool
    skip_rss: bool
    #: Records/s for the latency run; None: half of (b)'s rate.
    latency_rate: float | None = None
    #: The sidecar's batch.max_wait_ms (linger) in the latency run.
    latency_max_wait_ms: int = BATCH["max_wait_ms"]
    #: Phase (c): acks with outputs, `plain` or `transactions`; None skips it.
    outputs: str | None = None


async def run_config(
    kafka: LocalKafka, topics: Topics, config: Config, options: Options
) -> dict[str, Any]:
    row: dict[str, Any] = {**asdict(config), "records": options.records}
    if not CODECS[config.compression]():
        row["skipped"] = f"compression {config.compression} needs pip package {CODEC_PACKAGE}"
        log(f"SKIPPED {config}: {row['skipped']}")
        return row
    topic = await topics.filled("tput", options.records, config.compression)

    row.update(await throughput_in_process(kafka, config.listener, topic, options.records))
    log(f"(a) aiokafka in-process:   {row['a_records_per_s']:>10,} records/s")
    row.update(
        await throughput_sidecar(kafka, config.listener, config.ordering, topic, options.records)
    )
    log(
        f"(b) via kafka-sidecar ({config.listener}, ordering {config.ordering}, "
        f"{config.compression}): {row['b_records_per_s']:>10,} records/s (acked, committed)"
    )
    row["ratio_b_a"] = round(row["b_records_per_s"] / row["a_records_per_s"], 3)
    if options.outputs is not None:
        out = await topics.create("out")
        c = await throughput_sidecar(
            kafka,
            config.listener,
            config.ordering,
            topic,
            options.records,
            (options.outputs, out),
        )
        row.update({f"c_{key.removeprefix('b_')}": value for key, value in c.items()})
        row["outputs"] = options.outputs
        row["ratio_c_b"] = round(row["c_records_per_s"] / row["b_records_per_s"], 3)
        log(
            f"(c) via kafka-sidecar, acks with outputs ({options.outputs}): "
            f"{row['c_records_per_s']:>10,} records/s (c/b {row['ratio_c_b']:.2f}; sidecar "
            f"{row['c_sidecar_cpu_us_per_record']:.1f} µs/record)"
        )

    if not options.skip_latency:
        rate = options.latency_rate or row["b_records_per_s"] / 2
        count = max(1000, int(rate * options.latency_seconds))
        log(f"latency: {count:,} records paced at {rate:,.0f}/s, in-process then sidecar")
        a = await latency_in_process(
            kafka, topics, config.listener, config.compression, count, rate
        )
        b = await latency_sidecar(
            kafka,
            topics,
            config.listener,
            config.ordering,
            config.compression,
            count,
            rate,
            options.latency_max_wait_ms,
        )
        (a50, a99), (b50, b99) = a.percentiles_ms(), b.percentiles_ms()
        row.update(
            latency_target_rate=round(rate),
            latency_achieved_rate=round(min(a.achieved_rate(), b.achieved_rate())),
            latency_records=count,
            producer_cpu_us_per_record=us_per(max(a.producer_cpu, b.producer_cpu), count),
            a_latency_p50_ms=round(a50, 2),
            a_latency_p99_ms=round(a99, 2),
            b_latency_p50_ms=round(b50, 2),
            b_latency_p99_ms=round(b99, 2),
            added_latency_p50_ms=round(b50 - a50, 2),
            added_latency_p99_ms=round(b99 - a99, 2),
        )

    if not options.skip_rss:
        small_n, large_n = options.rss_backlog, options.rss_backlog * 10
        small = await topics.filled("rss", small_n, config.compression)
        large = await topics.filled("rss", large_n, config.compression)
        results = []
        for backlog, rss_topic in ((small_n, small), (large_n, large)):
            result = await rss_with_slow_app(
                kafka,
                config.listener,
                config.ordering,
                rss_topic,
                options.rss_seconds,
                options.rss_ack_interval,
            )
            log(
                f"RSS with {backlog:,} waiting: {result['rss_kib'] / 1024:.1f} MiB "
                f"(app took {result['received']:,})"
            )
            results.append(result)
        rss_small, rss_large = results[0]["rss_kib"], results[1]["rss_kib"]
        change = (rss_large - rss_small) / rss_small * 100
        row.update(
            rss_backlogs=[small_n, large_n],
            rss_small_mib=round(rss_small / 1024, 1),
            rss_large_mib=round(rss_large / 1024, 1),
            rss_change_pct=round(change, 1),
            rss_flat=abs(change) <= 10,
        )
    return row


# --- output ----------------------------------------------------------------------------------


def cell(row: dict[str, Any], key: str, fmt: str = "{:,}") -> str:
    return fmt.format(row[key]) if key in row else "-"


def latency_cell(row: dict[str, Any], pct: str) -> str:
    if f"added_latency_{pct}_ms" not in row:
        return "-"
    return (
        f"{row[f'a_latency_{pct}_ms']:.1f} / {row[f'b_latency_{pct}_ms']:.1f} / "
        f"**{row[f'added_latency_{pct}_ms']:+.1f}**"
    )


def table(rows: list[dict[str, Any]], options: Options) -> str:
    head = [
        "ordering",
        "listener",
        "compr.",
        "(a) rec/s in-proc",
        "(b) rec/s sidecar",
        "b/a",
        "(c) rec/s with outputs",
        "c/b",
        "CPU µs/rec in-proc",
        "CPU µs/rec app",
        "CPU µs/rec sidecar",
        "CPU µs/rec broker (a / b)",
        "latency rate/s",
        "p50 ms a / b / added",
        "p99 ms a / b / added",
        "sidecar peak RSS MiB",
        f"RSS MiB {options.rss_backlog // 1000}k / {options.rss_backlog // 100}k waiting",
        "RSS change",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        if "skipped" in row:
            cells = [row["ordering"], row["listener"], row["compression"], row["skipped"]]
            cells += [""] * (len(head) - len(cells))
        else:
            cells = [
                row["ordering"],
                row["listener"],
                row["compression"],
                cell(row, "a_records_per_s"),
                cell(row, "b_records_per_s"),
                cell(row, "ratio_b_a", "{:.2f}"),
                cell(row, "c_records_per_s"),
                cell(row, "ratio_c_b", "{:.2f}"),
                cell(row, "a_cpu_us_per_record", "{:.1f}"),
                cell(row, "app_cpu_us_per_record", "{:.1f}"),
                cell(row, "sidecar_cpu_us_per_record", "{:.1f}"),
                " / ".join(
                    "?" if row[key] is None else f"{row[key]:.1f}"
                    for key in ("a_broker_cpu_us_per_record", "b_broker_cpu_us_per_record")
                ),
                cell(row, "latency_achieved_rate"),
                latency_cell(row, "p50"),
                latency_cell(row, "p99"),
                cell(row, "sidecar_peak_rss_mib", "{:.0f}"),
                (
                    f"{row['rss_small_mib']:.0f} / {row['rss_large_mib']:.0f}"
                    if "rss_small_mib" in row
                    else "-"
                ),
                (
                    f"{row['rss_change_pct']:+.1f}% ({'flat' if row['rss_flat'] else 'NOT flat'})"
                    if "rss_change_pct" in row
                    else "-"
                ),
            ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def notes(options: Options) -> str:
    cores = os.cpu_count()
    load = os.getloadavg()[0]
    pace = (
        f"{options.latency_rate:,.0f} records/s" if options.latency_rate else "half of (b)'s rate"
    )
    return "\n".join(
        [
            f"- {options.records:,} records x 1 KiB, {PARTITIONS} partitions; sidecar batch "
            f"{BATCH}, window {WINDOW}, commits every {COMMIT_INTERVAL_MS} ms; (a) uses the "
            "same listener as (b).",
            f"- {cores} cores, shared by the broker (JVM), the sidecar, this process (app and "
            f"in-process consumer) and the paced producer; 1-min load at the end {load:.2f}. "
            "CPU = utime+stime over the timed phase (getrusage for this process, /proc/PID/stat "
            "for the sidecar and broker), divided by the records.",
            f"- Latency: time.time_ns at produce (in the value) -> receipt, paced producer in its "
            f"own process at {pace} for {options.latency_seconds:g}s (sidecar linger "
            f"max_wait_ms {options.latency_max_wait_ms}), first second "
            "dropped; a = in-process consumer, b = sidecar -> gRPC app; added = b - a.",
            f"- RSS: fresh sidecar, app acking one batch per {options.rss_ack_interval:g}s, "
            f"largest VmRSS sampled over {options.rss_seconds:g}s with {options.rss_backlog:,} vs "
            f"{options.rss_backlog * 10:,} records waiting; flat = within ±10%. Peak RSS = VmHWM "
            "after the throughput run.",
        ]
    )


# --- main ------------------------------------------------------------------------------------


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--ordering", choices=["none", "partition"], default="none")
    parser.add_argument("--listener", choices=["plaintext", "iam"], default="plaintext")
    parser.add_argument("--compression", choices=list(CODECS), default="none")
    parser.add_argument(
        "--matrix",
        action="store_true",
        help="every combination of ordering none|partition, listener plaintext|iam and "
        "compression none|lz4|zstd, in one table",
    )
    parser.add_argument(
        "--outputs",
        choices=["plain", "transactions"],
        help="add phase (c): the app acks each batch with one output per record, written "
        "idempotently (plain) or in transactions with the commits",
    )
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--skip-rss", action="store_true")
    parser.add_argument("--latency-seconds", type=float, default=10.0)
    parser.add_argument(
        "--latency-rate",
        type=float,
        help="records/s for the latency run (default: half of the sidecar's rate); on a "
        "machine the producer, broker, sidecar and app share, half the peak saturates it, "
        "so a light-load figure shows the sidecar's own added latency",
    )
    parser.add_argument(
        "--latency-max-wait-ms",
        type=int,
        default=BATCH["max_wait_ms"],
        help="the sidecar's batch.max_wait_ms in the latency run: below max_records a batch "
        "waits that long for more by design (0: goes out with what is there)",
    )
    parser.add_argument(
        "--rss-backlog", type=int, default=30_000, help="smaller backlog; the larger is 10x"
    )
    parser.add_argument("--rss-seconds", type=float, default=8.0)
    parser.add_argument(
        "--rss-ack-interval", type=float, default=0.25, help="the slow app's seconds per batch"
    )
    args = parser.parse_args()
    options = Options(
        records=args.records,
        latency_seconds=args.latency_seconds,
        rss_backlog=args.rss_backlog,
        rss_seconds=args.rss_seconds,
        rss_ack_interval=args.rss_ack_interval,
        skip_latency=args.skip_latency,
        skip_rss=args.skip_rss,
        latency_rate=args.latency_rate,
        latency_max_wait_ms=args.latency_max_wait_ms,
        outputs=args.outputs,
    )
    if args.matrix:
        configs = [
            Config(ordering, listener, compression)
            for compression, listener, ordering in itertools.product(
                ["none", "lz4", "zstd"], ["plaintext", "iam"], ["none", "partition"]
            )
        ]
    else:
        configs = [Config(args.ordering, args.listener, args.compression)]
        if not CODECS[args.compression]():
            parser.error(
                f"compression {args.compression}: aiokafka has no codec for it here; "
                f"pip package {CODEC_PACKAGE} (aiokafka[{args.compression}]) is needed in the "
                "environment of the bench and the sidecar"
            )

    kafka = LocalKafka.ensure_started()
    topics = Topics(kafka)
    rows: list[dict[str, Any]] = []
    try:
        for config in configs:
            log(f"== ordering {config.ordering}, {config.listener}, {config.compression}")
            row = await run_config(kafka, topics, config, options)
            row["loadavg_1m"] = round(os.getloadavg()[0], 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        await topics.delete_all()
    print()
    print(table(rows, options))
    print()
    print(notes(options))


if __name__ == "__main__":
    asyncio.run(main())
