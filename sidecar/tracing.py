"""OpenTelemetry spans that continue the producer's trace through the sidecar.

A record whose headers carry a W3C `traceparent` (and maybe `tracestate`) gets one CONSUMER
span per delivery, child of the producer's span: it starts when the record goes out to the
app and ends when the app settles it (ack, retry, dead letter) or it is taken back
(deadline, stream loss, revoke). Records without trace context get none: a span per record of
every topic would cost more than it tells. The headers themselves always pass through to the
app untouched, so apps can continue the trace too.

Optional: needs the `otel` extra and `tracing.otlp_endpoint`.
"""

from __future__ import annotations

from typing import Any

from sidecar import wire
from sidecar.config import TracingConfig
from sidecar.inflight import Pending

_CONTEXT_HEADERS = ("traceparent", "tracestate")
#: Outcomes that mean the app failed the record (as opposed to it moving elsewhere).
_FAILURES = frozenset({"retry", "dead_letter", "deadline"})


class TracingUnavailable(Exception):
    """tracing.otlp_endpoint is set but the otel extra is not installed."""


class Tracing:
    def __init__(self, config: TracingConfig) -> None:
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
            from opentelemetry.trace import SpanKind, Status, StatusCode
            from opentelemetry.trace.propagation.tracecontext import (
                TraceContextTextMapPropagator,
            )
        except ImportError as exc:
            raise TracingUnavailable(
                "tracing.otlp_endpoint is set but OpenTelemetry is not installed: "
                "pip install 'kafka-sidecar[otel]'"
            ) from exc
        endpoint = config.otlp_endpoint
        self._provider = TracerProvider(
            resource=Resource.create({"service.name": config.service_name})
        )
        self._provider.add_span_processor(
            BatchSpanProcessor(
                OTLPSpanExporter(endpoint=endpoint, insecure=not str(endpoint).startswith("https")),
                schedule_delay_millis=1000,
            )
        )
        self._tracer = self._provider.get_tracer("kafka-sidecar")
        self._propagator = TraceContextTextMapPropagator()
        self._kind = SpanKind.CONSUMER
        self._error = Status(StatusCode.ERROR)

    def delivered(self, pending: Pending, group_id: str) -> None:
        """The record goes out to the app: start its span if it carries trace context."""
        message = wire.message(pending)
        carrier = {
            key: value.decode("latin-1")
            for key, value in message.headers
            if key in _CONTEXT_HEADERS and value is not None
        }
        if "traceparent" not in carrier:
            return
        attributes: dict[str, Any] = {
            "messaging.system": "kafka",
            "messaging.operation.type": "process",
            "messaging.destination.name": message.topic,
            "messaging.destination.partition.id": str(message.partition),
            "messaging.kafka.offset": message.offset,
            "messaging.consumer.group.name": group_id,
            "kafka_sidecar.delivery_attempt": pending.attempts,
        }
        pending.span = self._tracer.start_span(
            f"process {message.topic}",
            context=self._propagator.extract(carrier),
            kind=self._kind,
            attributes=attributes,
        )

    def ended(self, pending: Pending, outcome: str) -> None:
        """The delivery is over: settled, or taken back to be redelivered."""
        span = pending.span
        if span is None:
            return
        pending.span = None
        span.set_attribute("kafka_sidecar.outcome", outcome)
        if outcome in _FAILURES:
            span.set_status(self._error)
        span.end()

    def shutdown(self) -> None:
        """Flushes what is still buffered."""
        self._provider.shutdown()
