"""`ordering: key` against `ordering: partition` on one partition, with slow records.

The case key ordering is for: few partitions (here one), records that take a while each
(`--delay-ms`, an `asyncio.sleep` per record), and an app scaled out to several workers
(`--workers` streams, each handling its records one at a time and acking each when done, all
with the same window). Under partition ordering the partition has one batch out at a time, so
one worker works and the rest wait; under key ordering each worker gets records of other keys.
Then one key's records are nacked every time (`--poison`), to show what that costs the others.

Prints one JSON line per run and a summary (stdout); progress on stderr. Timing only:
nothing is asserted (tests/test_key_ordering.py proves the order).

    .venv/bin/python bench/key_ordering.py [--records 20000] [--keys 1000] [--delay-ms 2]
        [--workers 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kafkasidecar.v1 import consumer_pb2 as pb
from tests.localkafka import LocalKafka, committed_offsets
from tests.sidecarproc import AppStream, SidecarProcess, group_subscription, ref

BATCH = {"max_records": 50, "max_bytes": 1048576, "max_wait_ms": 5}
WINDOW = {"max_outstanding_batches": 2, "max_outstanding_records": 100}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def key(i: int, keys: int) -> bytes:
    return b"key-%d" % (i % keys)


async def make_topic(kafka: LocalKafka, records: int, keys: int) -> str:
    topic = f"bench-keys-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.plaintext)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, 1, 1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=kafka.plaintext, linger_ms=20)
    await producer.start()
    try:
        for i in range(records):
            await producer.send(topic, b"%d" % i, key=key(i, keys), partition=0)
        await producer.flush()
    finally:
        await producer.stop()
    return topic


async def run(
    kafka: LocalKafka,
    topic: str,
    ordering: str,
    records: int,
    delay_s: float,
    workers: int,
    keys: int,
    poison: bytes | None,
) -> dict[str, Any]:
    """Records/s from the first `open` until the group's commit reaches the end."""
    sub = group_subscription(
        f"keys-{ordering}",
        topic,
        ordering=ordering,
        batch=BATCH,
        window=WINDOW,
        commit_interval_ms=200,
        retry={"initial_backoff_ms": 50, "max_backoff_ms": 50, "max_attempts": 1_000_000},
    )
    sidecar = SidecarProcess(kafka, [sub], listener="plaintext")
    sidecar.config_path.write_text(sidecar.config_path.read_text().replace("DEBUG", "INFO"))
    sidecar.start()
    done = asyncio.Event()
    acked = 0
    try:
        await sidecar.wait_serving()
        async with grpc.aio.insecure_channel(sidecar.address) as channel:

            async def worker() -> None:
                nonlocal acked
                app = AppStream(channel)
                await app.open(sub["name"])
                try:
                    while not done.is_set():
                        try:
                            response = await app.next("batch", timeout=1)
                        except TimeoutError:
                            continue
                        for record in response.batch.records:
                            if record.key == poison:
                                app.send(
                                    pb.ConsumeRequest(
                                        nack=pb.Nack(
                                            records=[ref(record)], action=pb.NACK_ACTION_RETRY
                                        )
                                    )
                                )
                                continue
                            await asyncio.sleep(delay_s)
                            app.ack(records=[ref(record)])
                            acked += 1
                finally:
                    app.close()

            started = time.perf_counter()
            tasks = [asyncio.create_task(worker()) for _ in range(workers)]
            # A poison key's first record is nacked forever: its later ones wait behind it.
            target = records - (len(range(0, records, keys)) if poison else 0)
            while acked < target:
                await asyncio.sleep(0.05)
            elapsed = time.perf_counter() - started
            done.set()
            await asyncio.gather(*tasks)
        if poison is None:
            async with asyncio.timeout(60):
                while (await committed_offsets(kafka, sub["group_id"])).get((topic, 0)) != records:
                    await asyncio.sleep(0.1)
    finally:
        sidecar.stop()
    return {
        "ordering": ordering,
        "poison_key": poison is not None,
        "records": target,
        "records_per_s": round(target / elapsed),
        "seconds": round(elapsed, 2),
    }


async def main(args: argparse.Namespace) -> None:
    kafka = LocalKafka.ensure_started()
    topic = await make_topic(kafka, args.records, args.keys)
    delay = args.delay_ms / 1000
    rows = []
    for ordering, poison in (("partition", None), ("key", None), ("key", key(0, args.keys))):
        log(f"ordering {ordering}{' with a poison key' if poison else ''} ...")
        row = await run(
            kafka, topic, ordering, args.records, delay, args.workers, args.keys, poison
        )
        print(json.dumps(row), flush=True)
        rows.append(row)
    partition, by_key, poisoned = (r["records_per_s"] for r in rows)
    print(
        f"\n{args.records:,} records, 1 partition, {args.keys:,} keys, {args.delay_ms:g} ms per "
        f"record, {args.workers} workers (streams) each handling its records one at a time, "
        f"batch {BATCH}, window {WINDOW} per stream:\n"
        f"- ordering partition: {partition:,} records/s\n"
        f"- ordering key: {by_key:,} records/s ({by_key / partition:.1f}x)\n"
        f"- ordering key, one key always nacked: {poisoned:,} records/s of the other keys "
        f"({(poisoned / by_key - 1) * 100:+.0f}% against no poison key)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--delay-ms", type=float, default=2.0)
    parser.add_argument("--workers", type=int, default=16)
    asyncio.run(main(parser.parse_args()))
