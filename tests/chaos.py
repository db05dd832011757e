"""Load and faults on the three-broker bed (`scripts/local-kafka start --brokers 3`).

A paced producer writes a topic while an app, attached to a real sidecar over gRPC, acks every
batch after a random delay. Faults are the script's own broker commands (a controlled restart,
SIGKILL, start). Everything is judged by what Kafka says: the producer's offsets, the group's
committed offsets against the end offsets; the sidecar's log and metrics add the figures
(reconnects, errors after recovery). Used by tests/test_chaos.py and bench/soak.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import grpc
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from kafkasidecar.v1 import consumer_pb2 as pb
from tests.localkafka import SCRIPT, LocalKafka, committed_offsets, end_offsets
from tests.sidecarproc import AppStream, SidecarProcess
from tests.test_metrics import scrape

#: A record of the load's topic: (partition, offset).
Key = tuple[int, int]


async def broker_command(command: str, broker: int) -> None:
    """`scripts/local-kafka restart-broker|kill-broker|start-broker N`; they wait for the
    broker's listeners (start, restart) or its exit (kill)."""
    proc = await asyncio.create_subprocess_exec(
        str(SCRIPT),
        f"{command}-broker",
        str(broker),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0, f"{command}-broker {broker}: {out.decode(errors='replace')}"


class Cluster:
    """What the brokers say about leaders, replicas and coordinators (PLAINTEXT, no auth)."""

    def __init__(self, kafka: LocalKafka) -> None:
        self._kafka = kafka

    async def _admin(self) -> AIOKafkaAdminClient:
        admin = AIOKafkaAdminClient(
            bootstrap_servers=self._kafka.plaintext, request_timeout_ms=10000
        )
        await admin.start()
        return admin

    async def partitions(self, topics: Iterable[str], timeout: float = 30) -> list[dict[str, Any]]:
        """Every partition of `topics`. A broker that has not yet heard of a topic made a moment
        ago answers UNKNOWN_TOPIC_OR_PARTITION with no partitions: ask again until all are known."""
        topics = list(topics)
        admin = await self._admin()
        try:
            async with asyncio.timeout(timeout):
                while True:
                    described = await admin.describe_topics(topics)
                    if all(t["error_code"] == 0 and t["partitions"] for t in described):
                        return [p for topic in described for p in topic["partitions"]]
                    await asyncio.sleep(0.2)
        finally:
            await admin.close()

    async def leaders(self, topic: str) -> Counter[int]:
        """How many of the topic's partitions each broker leads."""
        return Counter(p["leader"] for p in await self.partitions([topic]))

    async def coordinator(self, group_id: str) -> int:
        admin = await self._admin()
        try:
            return int(await admin.find_coordinator(group_id))
        finally:
            await admin.close()

    async def wait_in_sync(self, topics: Iterable[str], timeout: float = 120) -> float:
        """Until every partition of `topics` has all its replicas in sync (as MSK's rolling
        patching waits between brokers); returns the seconds it took."""
        topics = list(topics)
        start = time.monotonic()
        async with asyncio.timeout(timeout):
            while True:
                with contextlib.suppress(Exception):  # a broker may be mid-start
                    parts = await self.partitions(topics)
                    if parts and all(
                        p["error_code"] == 0 and len(p["isr"]) == len(p["replicas"]) >= 3
                        for p in parts
                    ):
                        return time.monotonic() - start
                await asyncio.sleep(0.5)


@dataclass
class Fault:
    """One fault: when it began and ended (wall clock), and what was unsettled as it began."""

    name: str
    began: float
    ended: float = 0.0
    unsettled: int = 0


@dataclass
class Load:
    """A paced producer and an app that acks each batch after a random delay, around one
    sidecar subscription. Call `run()` as a task, inject faults, then `finish()`."""

    kafka: LocalKafka
    sidecar: SidecarProcess
    #: the sidecar's metrics address (host:port)
    metrics: str
    subscription: dict[str, Any]
    topic: str
    records: int
    rate: float
    ack_delay: tuple[float, float] = (0.0, 0.05)
    #: when set, each ack carries one output per record to this topic (`chaos|<p>:<o>`)
    outputs_topic: str | None = None
    produced: set[Key] = field(default_factory=set)
    produce_failures: int = 0
    deliveries: Counter[Key] = field(default_factory=Counter)
    #: monotonic time of every batch's arrival
    arrivals: list[float] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    streams_opened: int = 0
    started: float = 0.0
    reconnects: float = 0.0
    _reopen: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def group_id(self) -> str:
        return str(self.subscription["group_id"])

    async def start(self, flowing: int = 5_000) -> None:
        """Starts producing and consuming; returns once `flowing` records were delivered."""
        self.started = time.monotonic()
        self.reconnects = -await metric(self.metrics, "kafka_sidecar_broker_reconnects_total")
        self._tasks = [asyncio.create_task(self.produce()), asyncio.create_task(self.consume())]
        async with asyncio.timeout(120):
            while len(self.deliveries) < flowing:
                await asyncio.sleep(0.2)

    async def finish(self, timeout: float = 300) -> None:
        """Until the producer is done, every produced record was delivered and the group's
        commits reach the end offsets (Kafka's view)."""
        await self._tasks[0]
        await self.wait_done(timeout)
        self.reconnects += await metric(self.metrics, "kafka_sidecar_broker_reconnects_total")

    def stop(self) -> None:
        for task in self._tasks:
            task.cancel()

    async def produce(self) -> None:
        """`records` records at `rate` per second, keys spread over the partitions; a record
        counts as produced once the broker acknowledged it (acks=all, idempotent)."""
        producer = AIOKafkaProducer(
            bootstrap_servers=self.kafka.plaintext,
            acks="all",
            enable_idempotence=True,
            linger_ms=20,
            request_timeout_ms=30000,
        )
        await producer.start()
        sent: list[asyncio.Future[Any]] = []
        try:
            start = time.monotonic()
            for i in range(self.records):
                due = start + i / self.rate
                if (wait := due - time.monotonic()) > 0:
                    await asyncio.sleep(wait)
                sent.append(await producer.send(self.topic, b"v%d" % i, key=b"k%d" % i))
            results = await asyncio.gather(*sent, return_exceptions=True)
        finally:
            await producer.stop()
        for result in results:
            if isinstance(result, BaseException):
                self.produce_failures += 1
            else:
                self.produced.add((result.partition, result.offset))

    async def consume(self) -> None:
        """The app: one stream at a time (`reconnect()` swaps it), acks after a random delay."""
        async with grpc.aio.insecure_channel(self.sidecar.address) as channel:
            while True:
                app = AppStream(channel, keep=False)
                self._reopen.clear()
                await app.open(self.subscription["name"])
                self.streams_opened += 1
                acks: set[asyncio.Task[None]] = set()
                reopen = asyncio.create_task(self._reopen.wait())
                try:
                    while not reopen.done():
                        nxt = asyncio.create_task(app.next("batch", timeout=3600))
                        await asyncio.wait({nxt, reopen}, return_when=asyncio.FIRST_COMPLETED)
                        if not nxt.done():
                            nxt.cancel()
                            break
                        batch = nxt.result().batch
                        self.arrivals.append(time.monotonic())
                        self.deliveries.update((r.partition, r.offset) for r in batch.records)
                        task = asyncio.create_task(self._ack_later(app, batch))
                        acks.add(task)
                        task.add_done_callback(acks.discard)
                finally:
                    reopen.cancel()
                    for task in acks:
                        task.cancel()
                    app.close()
                    app.cancel()

    async def _ack_later(self, app: AppStream, batch: pb.Batch) -> None:
        await asyncio.sleep(random.uniform(*self.ack_delay))
        outputs = [
            pb.OutputRecord(
                topic=self.outputs_topic, key=r.key, value=b"chaos|%d:%d" % (r.partition, r.offset)
            )
            for r in batch.records
            if self.outputs_topic
        ]
        app.send(pb.ConsumeRequest(ack=pb.Ack(batch_ids=[batch.batch_id], outputs=outputs)))

    def reconnect(self) -> None:
        """The app drops its stream (unacked batches go back to the sidecar) and opens another."""
        self._reopen.set()

    async def unsettled(self) -> int:
        """Records delivered but not yet committed, by Kafka's own committed offsets: what a
        fault now may deliver again."""
        committed = await committed_offsets(self.kafka, self.group_id)
        highest: dict[int, int] = {}
        for partition, offset in self.deliveries:
            highest[partition] = max(highest.get(partition, -1), offset)
        return sum(
            max(0, top + 1 - committed.get((self.topic, p), 0)) for p, top in highest.items()
        )

    @contextlib.asynccontextmanager
    async def fault(self, name: str) -> Any:
        """Times one fault and notes what was unsettled as it began."""
        fault = Fault(name, began=time.time(), unsettled=await self.unsettled())
        self.faults.append(fault)
        yield fault
        fault.ended = time.time()

    async def wait_done(self, timeout: float) -> None:
        async with asyncio.timeout(timeout):
            while True:
                ends = await end_offsets(self.kafka, self.topic)
                committed = await committed_offsets(self.kafka, self.group_id)
                if all(
                    committed.get(tp, -1) == end for tp, end in ends.items()
                ) and not self.produced - set(self.deliveries):
                    return
                await asyncio.sleep(1)

    @property
    def duplicates(self) -> int:
        return sum(self.deliveries.values()) - len(self.deliveries)

    def max_gap(self) -> float:
        """The longest time without a delivery, first delivery to last: the app's downtime."""
        times = sorted(self.arrivals)
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)

    def errors_after(self, when: float) -> list[str]:
        """Error-level lines the sidecar logged after `when` (wall clock)."""
        lines = []
        for line in self.sidecar.logs().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("level") not in ("error", "critical"):
                continue
            logged = datetime.strptime(entry["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
            if logged.timestamp() > when:
                lines.append(line)
        return lines

    def figures(self, scenario: str) -> str:
        """The closing note's table row, printed as a `[figures]` line."""
        line = (
            f"[figures] {scenario}: produced={len(self.produced)} "
            f"delivered={sum(self.deliveries.values())} duplicates={self.duplicates} "
            f"unsettled_at_faults={sum(f.unsettled for f in self.faults)} "
            f"downtime_s={self.max_gap():.1f} reconnects={self.reconnects:.0f} "
            f"produce_failures={self.produce_failures} "
            f"seconds={time.monotonic() - self.started:.0f}"
        )
        print(line)
        return line


async def metric(address: str, name: str) -> float:
    """One unlabelled sample from the sidecar's /metrics."""
    return (await scrape(address))[(name, ())]
