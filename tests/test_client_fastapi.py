"""examples/fastapi under uvicorn: serves HTTP while it consumes, and shuts down cleanly."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
from aiokafka import AIOKafkaProducer

from tests.clienttools import produce, wait_committed
from tests.localkafka import ROOT, LocalKafka
from tests.sidecarproc import SidecarProcess, group_subscription

TopicFactory = Callable[..., Awaitable[str]]
StartSidecar = Callable[..., Awaitable[SidecarProcess]]


async def test_fastapi_app_serves_stats_while_consuming_and_drains_on_shutdown(
    kafka: LocalKafka,
    new_topic: TopicFactory,
    producer: AIOKafkaProducer,
    start_sidecar: StartSidecar,
) -> None:
    topic = await new_topic(partitions=2)
    sub = group_subscription("web", topic, batch={"max_records": 5, "max_wait_ms": 100})
    sidecar = await start_sidecar([sub], listener="plaintext")
    http_socket = sidecar.dir / "http.sock"
    log_path = sidecar.dir / "app.log"
    env = {
        **os.environ,
        "KAFKA_SIDECAR_TARGET": sidecar.address,
        "KAFKA_SIDECAR_SUBSCRIPTION": "web",
    }
    with log_path.open("wb") as log_file:
        app = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "uvicorn",
            "app:app",
            "--app-dir",
            str(ROOT / "examples" / "fastapi"),
            "--uds",
            str(http_socket),
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        transport = httpx.AsyncHTTPTransport(uds=str(http_socket))
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:

            async def get(path: str) -> dict[str, Any]:
                response = await http.get(path, timeout=10)
                assert response.status_code == 200, response.text
                body: dict[str, Any] = response.json()
                return body

            async def until(path: str, check: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
                async with asyncio.timeout(60):
                    while True:
                        assert app.returncode is None, log_path.read_text()
                        try:
                            body = await get(path)
                        except httpx.TransportError:  # not listening yet
                            body = {}
                        if body and check(body):
                            return body
                        await asyncio.sleep(0.2)

            health = await until("/health", lambda b: b["connected"])
            assert health["status"] == "ok"
            await produce(producer, topic, 30, partitions=2)
            stats = await until("/stats", lambda b: b["records"] >= 30)
            assert stats["records"] == 30
            assert stats["partitions"] == [f"{topic}[0]", f"{topic}[1]"]
            assert stats["error"] is None
            await wait_committed(kafka, sub["group_id"], topic)

        # What Kubernetes does to stop a pod. uvicorn shuts down gracefully (the lifespan drains
        # the consumer), then re-raises the signal: exiting by SIGTERM is its clean exit.
        app.send_signal(signal.SIGTERM)
        async with asyncio.timeout(60):
            code = await app.wait()
        assert code in (0, -signal.SIGTERM), log_path.read_text()
    finally:
        if app.returncode is None:
            app.kill()
            await app.wait()
    log = log_path.read_text()
    assert "Application shutdown complete" in log, log
    assert "consumer drained: 30 records" in log, log
    assert "Traceback" not in log, log
