"""Throughput: a plain in-process aiokafka consumer vs the same records through kafka-sidecar.

Produces N 1 KiB records to a fresh 8-partition topic on the local broker, then times
(a) an AIOKafkaConsumer reading them all in-process, and
(b) kafka-sidecar (a real `kafka-sidecar run` process) delivering them to a Python app over
    gRPC (Unix socket) that acks each batch, until the group's commits reach the end offsets.
Prints records/s for both, the ratio b/a, and the sidecar's peak RSS.

    .venv/bin/python bench/throughput.py [--records 200000] [--listener plaintext|iam]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from pathlib import Path

import grpc
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kafkasidecar.v1 import consumer_pb2 as pb
from tests.localkafka import LocalKafka, committed_offsets, end_offsets
from tests.sidecarproc import AppStream, SidecarProcess, group_subscription

PARTITIONS = 8


async def produce(kafka: LocalKafka, topic: str, count: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.plaintext)
    await admin.start()
    await admin.create_topics([NewTopic(topic, PARTITIONS, 1)])
    await admin.close()
    producer = AIOKafkaProducer(
        bootstrap_servers=kafka.plaintext, linger_ms=20, max_batch_size=512 * 1024, acks=1
    )
    await producer.start()
    value = b"x" * 1024
    started = time.perf_counter()
    for i in range(count):
        await producer.send(topic, value, partition=i % PARTITIONS)
        if i % 50_000 == 0 and i:
            print(f"  produced {i:,}", file=sys.stderr)
    await producer.flush()
    await producer.stop()
    print(f"produced {count:,} x 1 KiB in {time.perf_counter() - started:.1f}s", file=sys.stderr)


async def plain_consumer(kafka: LocalKafka, topic: str, count: int) -> float:
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka.plaintext, enable_auto_commit=False)
    await consumer.start()
    tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
    consumer.assign(tps)
    await consumer.seek_to_beginning(*tps)
    seen = 0
    started = time.perf_counter()
    while seen < count:
        batches = await consumer.getmany(timeout_ms=500, max_records=5000)
        seen += sum(len(records) for records in batches.values())
    elapsed = time.perf_counter() - started
    await consumer.stop()
    return count / elapsed


async def through_sidecar(
    kafka: LocalKafka, topic: str, count: int, listener: str, ordering: str
) -> tuple[float, int]:
    sub = group_subscription(
        "bench",
        topic,
        batch={"max_records": 500, "max_bytes": 1048576, "max_wait_ms": 50},
        ordering=ordering,
        window={"max_outstanding_batches": 8, "max_outstanding_records": 8000},
        commit_interval_ms=500,
    )
    sidecar = SidecarProcess(kafka, [sub], listener=listener)
    sidecar.config_path.write_text(sidecar.config_path.read_text().replace("DEBUG", "INFO"))
    sidecar.start()
    try:
        await sidecar.wait_serving()
        ends = await end_offsets(kafka, topic)
        async with grpc.aio.insecure_channel(sidecar.address) as channel:
            app = AppStream(channel, keep=False)
            await app.open("bench")
            seen = 0
            started = time.perf_counter()
            while seen < count:
                response = await app.next()
                if response.WhichOneof("kind") == "batch":
                    seen += len(response.batch.records)
                    app.send(pb.ConsumeRequest(ack=pb.Ack(batch_ids=[response.batch.batch_id])))
            while (await committed_offsets(kafka, sub["group_id"])) != ends:
                await asyncio.sleep(0.05)
            elapsed = time.perf_counter() - started
            app.close()
        assert sidecar.proc is not None
        status = Path(f"/proc/{sidecar.proc.pid}/status").read_text()
        peak_kib = int(
            next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1]
        )
        return count / elapsed, peak_kib
    finally:
        sidecar.stop()


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--listener", choices=["plaintext", "iam"], default="plaintext")
    parser.add_argument("--ordering", choices=["none", "partition"], default="none")
    args = parser.parse_args()
    kafka = LocalKafka.ensure_started()
    topic = f"bench-{uuid.uuid4().hex[:8]}"
    await produce(kafka, topic, args.records)
    plain = await plain_consumer(kafka, topic, args.records)
    print(f"(a) aiokafka in-process:   {plain:>10,.0f} records/s", file=sys.stderr)
    sidecar, peak_kib = await through_sidecar(
        kafka, topic, args.records, args.listener, args.ordering
    )
    print(
        f"(b) via kafka-sidecar ({args.listener}, ordering {args.ordering}): "
        f"{sidecar:>10,.0f} records/s (acked, committed)",
        file=sys.stderr,
    )
    print(f"ratio b/a: {sidecar / plain:.2f}; sidecar peak RSS: {peak_kib / 1024:.0f} MiB")
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.plaintext)
    await admin.start()
    await admin.delete_topics([topic])
    await admin.close()


if __name__ == "__main__":
    asyncio.run(main())
