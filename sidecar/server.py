"""The app-facing gRPC server: ConsumerService, health and reflection.

A thin shell: each Consume stream is an outbox the dispatcher fills (written here) and a
reader task that feeds acks and nacks back to it. Stream errors that the contract names
(no or duplicate `open`, unknown subscription, bad token) end only that stream.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import grpc
import kafka_sidecar_transcoder as transcoder
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kafkasidecar.v1 import consumer_pb2 as pb
from sidecar import __version__
from sidecar.dispatcher import Dispatcher, Stream
from sidecar.offsets import OffsetsError
from sidecar.subscription import Subscription

log = logging.getLogger("sidecar.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ConsumerService"].full_name
#: An `open` that does not come within this long is a broken client, not a slow one.
OPEN_TIMEOUT_S = 30.0

StreamError = tuple[grpc.StatusCode, str]


class ConsumerService:
    """ConsumerService (registered by `_add_service`, not the generated helper: Consume
    responses may be bytes already)."""

    def __init__(self, subscriptions: Mapping[str, Subscription], auth_token: str | None) -> None:
        self._subscriptions = subscriptions
        self._auth_token = auth_token
        self.shutting_down = False

    async def _authorize(self, context: grpc.aio.ServicerContext) -> None:
        if self._auth_token is None:
            return
        metadata = dict(context.invocation_metadata() or ())
        given = metadata.get("authorization", "")
        expected = f"Bearer {self._auth_token}"
        if not given:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED, "missing authorization: Bearer <token> metadata"
            )
        if not hmac.compare_digest(given.encode(), expected.encode()):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "wrong bearer token")

    async def _subscription(self, name: str, context: grpc.aio.ServicerContext) -> Subscription:
        subscription = self._subscriptions.get(name)
        if subscription is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"unknown subscription {name!r}; configured: {sorted(self._subscriptions)}",
            )
            raise AssertionError("unreachable: abort raises")
        return subscription

    async def Consume(
        self,
        request_iterator: AsyncIterator[pb.ConsumeRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.ConsumeResponse | bytes]:
        # Read the first request before any abort: grpc.aio clients (grpc/grpc#36066) report
        # INTERNAL instead of the server's status when their write lands after the RPC ended.
        first = await self._first(request_iterator, context)
        await self._authorize(context)
        if first.WhichOneof("kind") != "open":
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "the first request on a stream must be `open`"
            )
        subscription = await self._subscription(first.open.subscription, context)
        if self.shutting_down:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the sidecar is shutting down")
        dispatcher, stream = subscription.attach(first.open, context.peer())
        reader = asyncio.create_task(self._read(request_iterator, dispatcher, stream))
        try:
            while True:
                message = await stream.outbox.get()
                if message is None:
                    break
                yield message
            error = reader.result() if reader.done() else None
            if error is not None:
                await context.abort(*error)
            if self.shutting_down:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "the sidecar shut down")
        finally:
            reader.cancel()
            subscription.detach(dispatcher, stream)

    async def _first(
        self, requests: AsyncIterator[pb.ConsumeRequest], context: grpc.aio.ServicerContext
    ) -> pb.ConsumeRequest:
        try:
            async with asyncio.timeout(OPEN_TIMEOUT_S):
                return await anext(requests)
        except StopAsyncIteration:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "stream ended before `open`")
        except DecodeError as exc:
            await context.abort(*_undecodable(exc, context.peer()))
        except TimeoutError:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"no `open` within {OPEN_TIMEOUT_S:.0f}s"
            )
        raise AssertionError("unreachable: abort raises")

    async def _read(
        self,
        requests: AsyncIterator[pb.ConsumeRequest],
        dispatcher: Dispatcher,
        stream: Stream,
    ) -> StreamError | None:
        """Feeds acks and nacks to the dispatcher; the stream ends when this returns.

        Nothing raised here reaches grpc: bad bytes end the stream with INVALID_ARGUMENT
        (a client problem, logged as a warning), and a bug of ours ends it with INTERNAL and
        an error log, its records going back to other streams."""
        try:
            async for request in requests:
                kind = request.WhichOneof("kind")
                if kind == "open":
                    return (
                        grpc.StatusCode.INVALID_ARGUMENT,
                        "`open` was already sent on this stream",
                    )
                if kind is None:
                    return grpc.StatusCode.INVALID_ARGUMENT, "empty ConsumeRequest"
                try:
                    if kind == "ack":
                        dispatcher.ack(stream, request.ack)
                    elif kind == "nack":
                        dispatcher.nack(stream, request.nack)
                    else:
                        dispatcher.drain(stream)
                except Exception:
                    log.exception(
                        "internal error applying a request; ending the stream",
                        extra={"stream": stream.id, "kind": kind},
                    )
                    return grpc.StatusCode.INTERNAL, f"internal error applying `{kind}`"
            return None
        except DecodeError as exc:
            return _undecodable(exc, stream.id)
        finally:
            stream.outbox.put_nowait(None)

    async def GetStatus(
        self, request: pb.GetStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetStatusResponse:
        await self._authorize(context)
        names = [request.subscription] if request.subscription else sorted(self._subscriptions)
        response = pb.GetStatusResponse(version=__version__)
        for name in names:
            subscription = await self._subscription(name, context)
            response.subscriptions.append(await subscription.status())
        return response

    async def ResetOffsets(
        self, request: pb.ResetOffsetsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ResetOffsetsResponse:
        await self._authorize(context)
        subscription = await self._subscription(request.subscription, context)
        try:
            return await subscription.reset_offsets(request)
        except OffsetsError as exc:
            await context.abort(getattr(grpc.StatusCode, exc.code), str(exc))
            raise AssertionError("unreachable: abort raises") from exc


def _response_bytes(message: pb.ConsumeResponse | bytes) -> bytes:
    """Batches come out of the dispatcher as bytes already (see `wire.batch`); the rest are
    messages."""
    return message if type(message) is bytes else message.SerializeToString()  # type: ignore[union-attr]


def _add_service(service: ConsumerService, server: grpc.aio.Server) -> None:
    """The generated `add_ConsumerServiceServicer_to_server`, except that Consume responses
    may be bytes already, which go out as they are."""
    handlers = {
        "Consume": grpc.stream_stream_rpc_method_handler(
            service.Consume,
            request_deserializer=pb.ConsumeRequest.FromString,
            response_serializer=_response_bytes,
        ),
        "GetStatus": grpc.unary_unary_rpc_method_handler(
            service.GetStatus,
            request_deserializer=pb.GetStatusRequest.FromString,
            response_serializer=pb.GetStatusResponse.SerializeToString,
        ),
        "ResetOffsets": grpc.unary_unary_rpc_method_handler(
            service.ResetOffsets,
            request_deserializer=pb.ResetOffsetsRequest.FromString,
            response_serializer=pb.ResetOffsetsResponse.SerializeToString,
        ),
    }
    missing = set(pb.DESCRIPTOR.services_by_name["ConsumerService"].methods_by_name) - set(handlers)
    assert not missing, f"ConsumerService methods without a handler: {sorted(missing)}"
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


def _undecodable(exc: DecodeError, stream: str) -> StreamError:
    """Bytes that are not a ConsumeRequest: the client's problem, not an error of ours."""
    log.warning(
        "request is not a ConsumeRequest; ending the stream",
        extra={"stream": stream, "error": str(exc)},
    )
    return grpc.StatusCode.INVALID_ARGUMENT, f"request is not a ConsumeRequest: {exc}"


def _status(serving: bool) -> health_pb2.HealthCheckResponse.ServingStatus.ValueType:
    return (
        health_pb2.HealthCheckResponse.SERVING
        if serving
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )


class Server:
    """The consumer API on the configured addresses (TCP and/or Unix socket), plus an optional
    health-only listener for probes that must reach the pod IP."""

    def __init__(
        self,
        addresses: list[str],
        subscriptions: Mapping[str, Subscription],
        auth_token: str | None,
        *,
        health_address: str | None = None,
        unix_socket_mode: int = 0o660,
        unix_socket_group: int | None = None,
    ) -> None:
        self.addresses = addresses
        self.service = ConsumerService(subscriptions, auth_token)
        self.health = health.aio.HealthServicer()
        self._subscriptions = list(subscriptions)
        self._unix_socket_mode = unix_socket_mode
        self._unix_socket_group = unix_socket_group
        self.serving: dict[str, bool] = {}
        self._server = grpc.aio.server(
            options=[
                # Batches are capped by batch.max_bytes, but one record may exceed it.
                ("grpc.max_send_message_length", 256 * 1024 * 1024),
                ("grpc.max_receive_message_length", 16 * 1024 * 1024),
                ("grpc.keepalive_time_ms", 30_000),
                ("grpc.http2.max_pings_without_data", 0),
            ]
        )
        _add_service(self.service, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            [SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], self._server
        )
        self._health_address = health_address
        self._health_server: grpc.aio.Server | None = None
        if health_address:
            self._health_server = grpc.aio.server()
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self._health_server)
        self.bound: list[str] = []

    async def start(self) -> None:
        sockets = []
        for address in self.addresses:
            if address.startswith("unix://"):
                # Once at startup, before serving: blocking file calls are harmless here.
                path = Path(address.removeprefix("unix://"))
                path.parent.mkdir(parents=True, exist_ok=True)
                if path.is_socket():  # noqa: ASYNC240
                    path.unlink()  # noqa: ASYNC240 - left by a killed predecessor
                sockets.append(path)
                # grpc creates the socket here, as 0777 less the umask: owner-only until its
                # group and mode are set below, so it is never open wider than configured.
                umask = os.umask(0o177)
                try:
                    self.bound.append(_bind(self._server, address, "listen.grpc"))
                finally:
                    os.umask(umask)
                continue
            self.bound.append(_bind(self._server, address, "listen.grpc"))
        # NOT_SERVING before anything listens: a probe must never see SERVING before the
        # group is joined.
        for name in self._subscriptions:
            await self.set_health(name, serving=False)
        if self._health_server is not None and self._health_address:
            _bind(self._health_server, self._health_address, "listen.health")
            await self._health_server.start()
        await self._server.start()
        for path in sockets:
            if self._unix_socket_group is not None:
                try:
                    os.chown(path, -1, self._unix_socket_group)
                except OSError as exc:
                    raise OSError(
                        f"listen.unix_socket_group: cannot give {path} to group"
                        f" {self._unix_socket_group}: {exc.strerror} (the sidecar's user must"
                        " belong to it)"
                    ) from exc
            path.chmod(self._unix_socket_mode)
        log.info(
            "listening",
            extra={
                "addresses": self.bound,
                "health": self._health_address,
                "pid": os.getpid(),
                # "native" (compiled) or "pure": what a record costs depends on it.
                "transcoder": transcoder.IMPLEMENTATION,
            },
        )

    async def set_health(self, subscription: str, serving: bool) -> None:
        """One subscription's health; the overall status is SERVING only if all are."""
        self.serving[subscription] = serving
        await self.health.set(subscription, _status(serving))
        overall = _status(all(self.serving.values()))
        for service in ("", SERVICE_NAME):
            await self.health.set(service, overall)

    async def stop(self, grace_s: float) -> None:
        await self.health.enter_graceful_shutdown()
        await self._server.stop(grace_s)
        if self._health_server is not None:
            await self._health_server.stop(0)


def _bind(server: grpc.aio.Server, address: str, key: str) -> str:
    """Adds a listening address; returns it with the real port when ":0" was asked."""
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise OSError(f"{key}: cannot listen on {address}: {exc}") from exc
    if address.startswith("unix://"):
        return address
    if port == 0:
        raise OSError(f"{key}: cannot listen on {address}")
    return f"{address.rsplit(':', 1)[0]}:{port}" if address.endswith(":0") else address
