"""A FastAPI app that consumes Kafka through kafka-sidecar while it serves HTTP.

The consumer lives in the app's lifespan: it starts with the app, runs as a background task
on the same event loop (the sidecar does the Kafka work, so nothing here can block a
heartbeat or trip a rebalance), and on shutdown it drains: no new batches, the batch in hand
is finished and acked, the stream ends, and anything unsettled goes back to the sidecar.

    KAFKA_SIDECAR_TARGET=unix:///tmp/sidecar.sock KAFKA_SIDECAR_SUBSCRIPTION=orders \\
        uvicorn app:app --app-dir examples/fastapi --port 8000

    GET /health   200 while the consumer runs (reconnecting to a restarting sidecar counts
                  as running); 503 once it has failed for good (e.g. unknown subscription)
    GET /stats    records and batches handled, redeliveries, partitions held, stream state

Settings (environment): KAFKA_SIDECAR_TARGET (default 127.0.0.1:50051),
KAFKA_SIDECAR_SUBSCRIPTION (required), KAFKA_SIDECAR_TOKEN (if the sidecar wants one),
KAFKA_SIDECAR_MAX_BATCHES (this worker's window, default 2).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from kafkasidecar import (
    PartitionsRevoked,
    Record,
    Rejected,
    SidecarConsumer,
    SidecarError,
    StreamLostError,
)

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
log = logging.getLogger("example.fastapi")
#: How long shutdown waits for the batch in hand before giving it back unfinished.
SHUTDOWN_GRACE_S = 20.0


@dataclass
class Stats:
    records: int = 0
    batches: int = 0
    redelivered: int = 0
    lost_batches: int = 0
    revocations: int = 0
    rejections: int = 0
    last_value: dict[str, str] = field(default_factory=dict)
    error: str | None = None


async def handle(record: Record, stats: Stats) -> None:
    """The app's real work goes here. This one remembers the last value per partition."""
    stats.last_value[f"{record.topic}[{record.partition}]"] = (record.value or b"").decode(
        errors="replace"
    )[:100]
    await asyncio.sleep(0)


async def consume(consumer: SidecarConsumer, stats: Stats) -> None:
    try:
        async with consumer:
            async for batch in consumer:
                for record in batch:
                    await handle(record, stats)
                    stats.redelivered += record.delivery_attempt > 1
                try:
                    await batch.ack()
                except StreamLostError:
                    # The sidecar restarted mid-batch: it redelivers these on the new stream.
                    stats.lost_batches += 1
                    continue
                stats.records += len(batch)
                stats.batches += 1
    except SidecarError as exc:
        stats.error = str(exc)
        log.error("consumer stopped: %s", exc)
        raise


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    stats = Stats()

    def revoked(event: PartitionsRevoked) -> None:
        stats.revocations += 1
        log.info("partitions revoked: %s", event.partitions)

    def rejected(event: Rejected) -> None:
        stats.rejections += 1
        log.warning("sidecar rejected a settlement: %s (%s)", event.reason.name, event.message)

    token = os.environ.get("KAFKA_SIDECAR_TOKEN") or None
    consumer = SidecarConsumer(
        os.environ.get("KAFKA_SIDECAR_TARGET", "127.0.0.1:50051"),
        os.environ["KAFKA_SIDECAR_SUBSCRIPTION"],
        client_id=f"fastapi-example-{os.getpid()}",
        max_outstanding_batches=int(os.environ.get("KAFKA_SIDECAR_MAX_BATCHES", "2")),
        token=token,
        on_revoked=revoked,
        on_rejected=rejected,
    )
    task = asyncio.create_task(consume(consumer, stats), name="kafka-consumer")
    app.state.consumer, app.state.stats, app.state.task = consumer, stats, task
    yield
    # Shutdown: stop new batches, let the loop finish (and ack) the batch in hand; the task's
    # `async with` then ends the stream. Past the grace, cancelling it drains just the same:
    # whatever was not acked is redelivered, never lost.
    await consumer.drain()
    done, _ = await asyncio.wait({task}, timeout=SHUTDOWN_GRACE_S)
    if not done:
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError, SidecarError):
        await task
    log.info("consumer drained: %d records in %d batches", stats.records, stats.batches)


app = FastAPI(title="kafka-sidecar FastAPI example", lifespan=lifespan)


@app.get("/health")
async def health() -> JSONResponse:
    task: asyncio.Task[None] = app.state.task
    consumer: SidecarConsumer = app.state.consumer
    running = not task.done()
    return JSONResponse(
        {"status": "ok" if running else "failed", "connected": consumer.connected},
        status_code=200 if running else 503,
    )


@app.get("/stats")
async def stats() -> dict[str, Any]:
    stats: Stats = app.state.stats
    consumer: SidecarConsumer = app.state.consumer
    return {
        "records": stats.records,
        "batches": stats.batches,
        "redelivered": stats.redelivered,
        "lost_batches": stats.lost_batches,
        "revocations": stats.revocations,
        "rejections": stats.rejections,
        "connected": consumer.connected,
        "stream_id": consumer.opened.stream_id if consumer.opened else None,
        "partitions": sorted(f"{tp.topic}[{tp.partition}]" for tp in consumer.assignment),
        "last_value": stats.last_value,
        "error": stats.error,
    }
