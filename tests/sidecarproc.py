"""Runs the real sidecar as a subprocess for integration tests, and talks to it as an app."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kafkasidecar.v1 import consumer_pb2 as pb
from kafkasidecar.v1 import consumer_pb2_grpc as pb_grpc
from tests.localkafka import LocalKafka

BIN = Path(sys.executable).parent


def kafka_section(kafka: LocalKafka, listener: str = "iam") -> dict[str, Any]:
    """The sidecar's `kafka:` config for one listener of the local broker."""
    if listener == "plaintext":
        return {"bootstrap_servers": kafka.plaintext.split(",")}
    if listener == "iam":
        return {
            "bootstrap_servers": kafka.iam.split(","),
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": "AWS_MSK_IAM",
            "aws": {"region": kafka.aws_region},
            "ssl": {"cafile": kafka.ca_file},
        }
    if listener == "scram":
        return {
            "bootstrap_servers": kafka.scram.split(","),
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": "SCRAM-SHA-512",
            "sasl_username": kafka.scram_username,
            "sasl_password": kafka.scram_password,
            "ssl": {"cafile": kafka.ca_file},
        }
    raise ValueError(listener)


def aws_env(kafka: LocalKafka) -> dict[str, str]:
    """Only the local test credentials: nothing from the developer's own AWS setup leaks in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        AWS_ACCESS_KEY_ID=kafka.aws_access_key_id,
        AWS_SECRET_ACCESS_KEY=kafka.aws_secret_access_key,
        AWS_REGION=kafka.aws_region,
        AWS_CONFIG_FILE=os.devnull,
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,
        AWS_EC2_METADATA_DISABLED="true",
    )
    return env


class SidecarProcess:
    """One `kafka-sidecar run` process with its config, socket and log in a temp dir."""

    def __init__(
        self,
        kafka: LocalKafka,
        subscriptions: Sequence[dict[str, Any]],
        *,
        listener: str = "iam",
        auth_token: str | None = None,
        tcp: str | None = None,
        metrics: str | None = None,
        listen: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        # Short path: Unix socket paths are limited to ~100 bytes.
        self.dir = Path(tempfile.mkdtemp(prefix="ks-", dir="/tmp"))
        self.socket = self.dir / "sidecar.sock"
        self.address = f"unix://{self.socket}"
        config: dict[str, Any] = {
            "kafka": kafka_section(kafka, listener),
            "listen": {"grpc": [self.address, *([tcp] if tcp else [])], "metrics": metrics},
            "subscriptions": list(subscriptions),
            "log": {"level": "DEBUG"},
            "shutdown_grace_ms": 10000,
        }
        if auth_token:
            config["listen"]["auth_token"] = auth_token
        config["listen"].update(listen or {})
        config.update(extra or {})
        self.config_path = self.dir / "sidecar.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = self.dir / "sidecar.log"
        self.env = env or aws_env(kafka)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> SidecarProcess:
        with self.log_path.open("ab") as log_file:
            self.proc = subprocess.Popen(
                [str(BIN / "kafka-sidecar"), "run", "--config", str(self.config_path)],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=self.env,
            )
        return self

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def wait_serving(self, service: str = "", timeout: float = 90) -> None:
        """Until health says SERVING: the consumer joined its group."""
        async with grpc.aio.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            async with asyncio.timeout(timeout):
                while True:
                    assert self.proc is not None
                    assert self.proc.poll() is None, self.logs()
                    with contextlib.suppress(grpc.aio.AioRpcError):
                        reply = await stub.Check(
                            health_pb2.HealthCheckRequest(service=service), timeout=2
                        )
                        if reply.status == health_pb2.HealthCheckResponse.SERVING:
                            return
                    await asyncio.sleep(0.2)

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 60) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        stop_process(self.proc)


def stop_process(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM, then SIGKILL if it has not exited within 30 s."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def group_subscription(name: str, topic: str, **overrides: Any) -> dict[str, Any]:
    sub: dict[str, Any] = {
        "name": name,
        "topics": [topic],
        "group_id": f"g-{name}-{uuid.uuid4().hex[:8]}",
        "batch": {"max_records": 100, "max_bytes": 1048576, "max_wait_ms": 200},
        "commit_interval_ms": 200,
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(sub.get(key), dict):
            sub[key] = {**sub[key], **value}
        else:
            sub[key] = value
    return sub


class AppStream:
    """An app's end of one Consume stream: send requests, receive responses by kind."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        metadata: Sequence[tuple[str, str]] | None = None,
        *,
        keep: bool = True,
    ) -> None:
        self._keep = keep
        self._requests: asyncio.Queue[pb.ConsumeRequest | None] = asyncio.Queue()
        self.call = pb_grpc.ConsumerServiceStub(channel).Consume(self._iterate(), metadata=metadata)
        self.received: list[pb.ConsumeResponse] = []
        # One task reads the call: timing out a read() itself would cancel the whole RPC.
        self._inbox: asyncio.Queue[pb.ConsumeResponse | BaseException | None] = asyncio.Queue()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for response in self.call:
                self._inbox.put_nowait(response)
            self._inbox.put_nowait(None)
        except BaseException as exc:  # the RPC's error, for next() to raise
            self._inbox.put_nowait(exc)

    async def _iterate(self) -> AsyncIterator[pb.ConsumeRequest]:
        while (request := await self._requests.get()) is not None:
            yield request

    def send(self, request: pb.ConsumeRequest) -> None:
        self._requests.put_nowait(request)

    async def open(
        self,
        subscription: str,
        max_outstanding_batches: int = 0,
        max_outstanding_records: int = 0,
        max_outstanding_bytes: int = 0,
    ) -> pb.Opened:
        self.send(
            pb.ConsumeRequest(
                open=pb.Open(
                    subscription=subscription,
                    max_outstanding_batches=max_outstanding_batches,
                    max_outstanding_records=max_outstanding_records,
                    max_outstanding_bytes=max_outstanding_bytes,
                )
            )
        )
        return (await self.next("opened")).opened

    async def next(self, kind: str | None = None, timeout: float = 60) -> pb.ConsumeResponse:
        """The next response (of `kind`, skipping others but keeping them in `received`)."""
        async with asyncio.timeout(timeout):
            while True:
                response = await self._inbox.get()
                if isinstance(response, BaseException):
                    self._inbox.put_nowait(response)
                    raise response
                assert response is not None, "stream ended"
                if self._keep:
                    self.received.append(response)
                if kind is None or response.WhichOneof("kind") == kind:
                    return response

    def ack(self, batch_ids: Sequence[int] = (), records: Sequence[pb.RecordRef] = ()) -> None:
        self.send(pb.ConsumeRequest(ack=pb.Ack(batch_ids=batch_ids, records=records)))

    def close(self) -> None:
        self._requests.put_nowait(None)

    def cancel(self) -> None:
        self.call.cancel()


def ref(record: pb.Record) -> pb.RecordRef:
    return pb.RecordRef(topic=record.topic, partition=record.partition, offset=record.offset)
