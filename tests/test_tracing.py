"""W3C trace context passes through untouched, and the sidecar's spans continue the producer's
trace (exported over OTLP to a collector the test runs)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import pytest
from aiokafka import AIOKafkaProducer
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

from tests.sidecarproc import AppStream, SidecarProcess, group_subscription, ref
from tests.test_failures import nack

TopicFactory = Callable[..., Awaitable[str]]
StartSidecar = Callable[..., Awaitable[SidecarProcess]]

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01"
TRACESTATE = "vendor=opaque,other=1"


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """The receiving end of OTLP/gRPC: keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[trace_pb2.Span] = []

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: object
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        for resource_spans in request.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                self.spans.extend(scope_spans.spans)
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture
async def collector() -> AsyncIterator[tuple[Collector, str]]:
    server = grpc.aio.server()
    servicer = Collector()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield servicer, f"http://127.0.0.1:{port}"
    finally:
        await server.stop(0)


async def test_spans_continue_the_producers_trace(
    new_topic: TopicFactory,
    producer: AIOKafkaProducer,
    start_sidecar: StartSidecar,
    collector: tuple[Collector, str],
) -> None:
    spans, endpoint = collector
    topic = await new_topic()
    context = [("traceparent", TRACEPARENT.encode()), ("tracestate", TRACESTATE.encode())]
    await producer.send_and_wait(topic, b"traced", key=b"a", headers=context)
    await producer.send_and_wait(topic, b"untraced", key=b"b")
    await producer.send_and_wait(topic, b"retried", key=b"c", headers=context)
    sub = group_subscription("traced", topic, retry={"initial_backoff_ms": 0})
    sidecar = await start_sidecar(
        [sub],
        listener="plaintext",
        extra={"tracing": {"otlp_endpoint": endpoint, "service_name": "sidecar-under-test"}},
    )
    async with grpc.aio.insecure_channel(sidecar.address) as channel:
        app = AppStream(channel)
        await app.open("traced")
        batch = (await app.next("batch")).batch
        traced, untraced, retried = batch.records
        # The headers reach the app exactly as produced.
        assert [(h.key, h.value) for h in traced.headers] == context
        assert not untraced.headers
        app.ack(records=[ref(traced), ref(untraced)])
        app.send(nack([retried], reason="try again"))
        again = (await app.next("batch")).batch
        app.ack(batch_ids=[again.batch_id])
        async with asyncio.timeout(60):
            while len(spans.spans) < 3:
                await asyncio.sleep(0.2)
        app.close()

    assert len(spans.spans) == 3, "one span per delivery of a traced record, none for the other"
    for span in spans.spans:
        assert span.trace_id.hex() == TRACE_ID
        assert span.parent_span_id.hex() == PARENT_SPAN_ID
        assert span.name == f"process {topic}"
        assert span.kind == trace_pb2.Span.SPAN_KIND_CONSUMER
    outcomes = sorted(
        next(a.value.string_value for a in s.attributes if a.key == "kafka_sidecar.outcome")
        for s in spans.spans
    )
    assert outcomes == ["ack", "ack", "retry"]
    assert {s.trace_state for s in spans.spans} == {TRACESTATE}
    # The nacked delivery is its own span, marked as failed.
    failed = [s for s in spans.spans if s.status.code == trace_pb2.Status.STATUS_CODE_ERROR]
    assert len(failed) == 1
