"""Helpers for the client and polyglot tests: records in, Kafka's own view out, toolchains."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from tests.harness import wait_committed as wait_committed
from tests.localkafka import ROOT, LocalKafka


async def produce(
    producer: AIOKafkaProducer, topic: str, count: int, *, partitions: int = 1, tag: str = "r"
) -> dict[tuple[int, int], bytes]:
    """`count` records round-robin over partitions; returns (partition, offset) -> value."""
    futures = []
    values = []
    for i in range(count):
        value = f"{tag}-{i:05d}".encode()
        values.append(value)
        futures.append(
            await producer.send(
                topic,
                value,
                key=f"k{i}".encode(),
                partition=i % partitions,
                headers=[("n", str(i).encode())],
            )
        )
    metas = await asyncio.gather(*futures)
    return {(m.partition, m.offset): v for m, v in zip(metas, values, strict=True)}


async def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 60) -> None:
    try:
        async with asyncio.timeout(timeout):
            while not predicate():
                await asyncio.sleep(0.1)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout:g}s waiting for {what}") from None


async def read_topic(kafka: LocalKafka, topic: str, count: int, timeout: float = 60) -> list[Any]:
    """The first `count` records of a one-partition topic, read with no group."""
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka.plaintext, enable_auto_commit=False)
    await consumer.start()
    records: list[Any] = []
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        async with asyncio.timeout(timeout):
            while len(records) < count:
                batch = await consumer.getmany(tp, timeout_ms=500)
                records.extend(batch.get(tp, []))
    finally:
        await consumer.stop()
    return records


# ---- toolchains ---------------------------------------------------------------------------------


def require(tool: str) -> str:
    """The tool's path; a missing toolchain fails the test loudly (it is part of CI's bar)."""
    path = shutil.which(tool)
    assert path, f"{tool!r} is not on PATH: the Go/Node client tests need it installed"
    return path


def run(cmd: list[str], *, cwd: Path = ROOT, timeout: float = 600, **env: str) -> str:
    """Runs a build/tool command; its output is in the assertion message when it fails."""
    result = subprocess.run(
        cmd,
        cwd=cwd,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, (
        f"{' '.join(cmd)} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
    )
    return result.stdout


def ensure_tool(script: str) -> str:
    """The path a `scripts/ensure-*` script prints (helm, promtool, prometheus: built with
    `go install` on a machine's first run, minutes; cached after)."""
    return run([str(ROOT / "scripts" / script)], timeout=1100).strip().splitlines()[-1]


def ensure_go() -> Path:
    """scripts/ensure-go: the pinned Go tools (`go install`), in their cache directory."""
    require("go")
    return Path(run([str(ROOT / "scripts" / "ensure-go")]).strip())


def ensure_node() -> Path:
    """scripts/ensure-node: `npm ci` in clients/node; returns that directory."""
    require("node")
    require("npm")
    return Path(run([str(ROOT / "scripts" / "ensure-node")]).strip())
