"""What grpcurl and Kubernetes probes rely on: reflection and health, on TCP and Unix sockets."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat
import uuid

import grpc
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from kafkasidecar.v1 import consumer_pb2 as pb
from kafkasidecar.v1 import consumer_pb2_grpc as pb_grpc
from tests.harness import consuming
from tests.localkafka import LocalKafka
from tests.sidecarproc import AppStream, SidecarProcess, group_subscription


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_reflection_and_health_on_tcp_and_unix_socket(kafka: LocalKafka) -> None:
    port = free_port()
    # Probes carry no token: health and reflection answer without one.
    async with consuming(
        kafka,
        "probe",
        open=False,
        auth_token="app-secret",
        sidecar_options={"tcp": f"127.0.0.1:{port}"},
    ) as c:
        for target in (f"127.0.0.1:{port}", c.sidecar.address):
            async with grpc.aio.insecure_channel(target) as channel:
                reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
                services: list[str] = []
                async for reply in reflect.ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(list_services="")])
                ):
                    services = [s.name for s in reply.list_services_response.service]
                assert "kafkasidecar.v1.ConsumerService" in services
                assert "grpc.health.v1.Health" in services

                health = health_pb2_grpc.HealthStub(channel)
                for service in ("", "kafkasidecar.v1.ConsumerService", "probe"):
                    reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
                    assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
                with pytest.raises(grpc.aio.AioRpcError) as missing:
                    await health.Check(
                        health_pb2.HealthCheckRequest(service="no-such-subscription")
                    )
                assert missing.value.code() == grpc.StatusCode.NOT_FOUND


async def test_health_only_listener_and_socket_mode(kafka: LocalKafka) -> None:
    """Probes can reach a health-only port while the consumer API stays on loopback/socket."""
    port = free_port()
    async with consuming(
        kafka,
        "probed",
        open=False,
        sidecar_options={"listen": {"health": f"127.0.0.1:{port}", "unix_socket_mode": "0600"}},
    ) as c:
        assert stat.S_IMODE(os.stat(c.sidecar.socket).st_mode) == 0o600
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="probed")
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            status = pb_grpc.ConsumerServiceStub(channel).GetStatus(pb.GetStatusRequest())
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await status
            assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_missing_topic_is_named_and_waited_for(
    kafka: LocalKafka, producer: AIOKafkaProducer
) -> None:
    topic = f"created-later-{uuid.uuid4().hex[:8]}"
    sidecar = SidecarProcess(kafka, [group_subscription("later", topic)], listener="plaintext")
    sidecar.start()
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.plaintext)
    await admin.start()
    try:
        async with asyncio.timeout(60):
            while "do not exist" not in sidecar.logs():
                await asyncio.sleep(0.2)
        await asyncio.sleep(1)  # ten metadata refreshes' worth of chances to flood the log
        assert "not found in cluster metadata" not in sidecar.logs()
        with pytest.raises(TimeoutError):
            await sidecar.wait_serving("later", timeout=1)
        assert stat.S_IMODE(os.stat(sidecar.socket).st_mode) == 0o660  # the default

        await admin.create_topics([NewTopic(topic, 1, 1)])
        await producer.send_and_wait(topic, b"here")
        await sidecar.wait_serving("later")
        async with grpc.aio.insecure_channel(sidecar.address) as channel:
            app = AppStream(channel)
            await app.open("later")
            assert [r.value for r in (await app.next("batch")).batch.records] == [b"here"]
            app.close()
    finally:
        sidecar.stop()
        with contextlib.suppress(Exception):
            await admin.delete_topics([topic])
        await admin.close()
