"""What grpcurl and Kubernetes probes rely on: reflection and health, on TCP and Unix sockets."""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.sidecarproc import SidecarProcess, group_subscription

TopicFactory = Callable[..., Awaitable[str]]
StartSidecar = Callable[..., Awaitable[SidecarProcess]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_reflection_and_health_on_tcp_and_unix_socket(
    new_topic: TopicFactory, start_sidecar: StartSidecar
) -> None:
    topic = await new_topic()
    port = free_port()
    # Probes carry no token: health and reflection answer without one.
    sidecar = await start_sidecar(
        [group_subscription("probe", topic)],
        listener="plaintext",
        auth_token="app-secret",
        tcp=f"127.0.0.1:{port}",
    )
    for target in (f"127.0.0.1:{port}", sidecar.address):
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
                await health.Check(health_pb2.HealthCheckRequest(service="no-such-subscription"))
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND
