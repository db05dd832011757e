"""Prometheus metrics, `kafka_sidecar_*`, on `listen.metrics` (path /metrics).

The dispatcher, consumer and dead-letter writer keep plain running totals; this collector
reads them at scrape time, so the per-record path never touches the metrics library (and
its locks). The HTTP server answers on a thread of its own, but the state it reads belongs
to the event loop (dicts that change while a scrape iterates them fail it), so a scrape is
built on the loop, between two of its callbacks. Process metrics (RSS, CPU, open fds) come
from prometheus-client's defaults.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

from aiokafka import TopicPartition
from prometheus_client import REGISTRY, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector

from sidecar import logs
from sidecar.subscription import GroupSubscription, Subscription

if TYPE_CHECKING:
    from sidecar.auth import MskIamTokenProvider


#: A scrape waits this long for the event loop; a loop busier than that fails the scrape.
SCRAPE_TIMEOUT_S = 5.0


class SidecarCollector(Collector):
    def __init__(
        self,
        subscriptions: Mapping[str, Subscription],
        token_provider: MskIamTokenProvider | None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self._subscriptions = subscriptions
        self._token_provider = token_provider
        #: The loop owning the state read here; None reads it on the calling thread.
        self._loop = loop

    def collect(self) -> Iterator[Metric]:
        loop = self._loop
        if loop is None or not loop.is_running() or _running_loop() is loop:
            return iter(list(self._collect()))
        built: concurrent.futures.Future[list[Metric]] = concurrent.futures.Future()

        def build() -> None:
            try:
                built.set_result(list(self._collect()))
            except BaseException as exc:  # the scrape fails, the loop goes on
                built.set_exception(exc)

        loop.call_soon_threadsafe(build)
        return iter(built.result(timeout=SCRAPE_TIMEOUT_S))

    def _collect(self) -> Iterator[Metric]:
        subs = list(self._subscriptions.values())
        yield from _counters(subs)
        yield from _gauges(subs)

        commits = SummaryMetricFamily(
            "kafka_sidecar_commit_seconds",
            "Offset commit latency (successful commits)",
            labels=["subscription"],
        )
        last = GaugeMetricFamily(
            "kafka_sidecar_last_commit_timestamp_seconds",
            "When the subscription last committed offsets (Unix time; commits happen only when "
            "something settled)",
            labels=["subscription"],
        )
        for sub in subs:
            if isinstance(sub, GroupSubscription):
                ok, _, seconds = _commit_totals(sub)
                commits.add_metric([sub.name], ok, seconds)
                when = sub.consumer.stats.last_commit
                if sub.config.transactions.enabled:
                    when = max(when, sub.outputs.stats.last_commit)
                if when:
                    last.add_metric([sub.name], when)
        yield commits
        yield last

        reconnects = CounterMetricFamily(
            "kafka_sidecar_broker_reconnects",
            "Broker connections dropped and re-established (MSK ends IAM sessions at token expiry)",
        )
        reconnects.add_metric([], logs.aiokafka_noise.reconnects)
        yield reconnects
        refreshes = CounterMetricFamily(
            "kafka_sidecar_token_refreshes", "MSK IAM tokens signed (first one included)"
        )
        failures = CounterMetricFamily(
            "kafka_sidecar_auth_failures", "Failed attempts to sign an MSK IAM token"
        )
        expiry = GaugeMetricFamily(
            "kafka_sidecar_token_expiry_timestamp_seconds", "When the current MSK IAM token expires"
        )
        provider = self._token_provider
        if provider is not None:
            refreshes.add_metric([], provider.refreshes)
            failures.add_metric([], provider.failures)
            expiry.add_metric([], provider.expires_at)
        else:
            refreshes.add_metric([], 0)
            failures.add_metric([], 0)
        yield refreshes
        yield failures
        if provider is not None:
            yield expiry


_COUNTERS = (
    ("records_delivered", "Records sent to apps, redeliveries included", "delivered"),
    (
        "redeliveries",
        "Deliveries after the first (retry, ack deadline, stream loss)",
        "redelivered",
    ),
    ("acks", "Records acked by apps", "acked"),
    ("ack_deadline_expired", "Records unsettled past ack_deadline_ms", "deadline_expired"),
    ("stream_lost_records", "Records handed back because their stream ended", "stream_lost"),
    ("rejected_refs", "Ack/nack refs refused (unknown, already settled, revoked)", "rejected"),
    (
        "skipped_settled_records",
        "Records fetched again but not redelivered: settled before a restart or rebalance",
        "skipped",
    ),
    ("acks_with_outputs", "Acks that carried outputs", "acks_with_outputs"),
    (
        "output_failed_records",
        "Records whose ack's outputs could not be written (delivered again, as if nacked)",
        "outputs_failed",
    ),
)


def _counters(subs: Iterable[Subscription]) -> Iterator[Metric]:
    subs = list(subs)
    for name, documentation, field in _COUNTERS:
        family = CounterMetricFamily(
            f"kafka_sidecar_{name}", documentation, labels=["subscription"]
        )
        for sub in subs:
            family.add_metric([sub.name], getattr(sub.stats, field))
        yield family

    nacks = CounterMetricFamily(
        "kafka_sidecar_nacks", "Records nacked by apps", labels=["subscription", "action"]
    )
    dead = CounterMetricFamily(
        "kafka_sidecar_dead_lettered", "Records written to the DLQ", labels=["subscription"]
    )
    dlq_failures = CounterMetricFamily(
        "kafka_sidecar_dead_letter_failures",
        "Failed DLQ write attempts (each retried; the record stays unsettled), by cause",
        labels=["subscription", "cause"],
    )
    commits = CounterMetricFamily(
        "kafka_sidecar_commits", "Offset commits", labels=["subscription", "result"]
    )
    rebalances = CounterMetricFamily(
        "kafka_sidecar_rebalances", "Partition revocations", labels=["subscription"]
    )
    produced = CounterMetricFamily(
        "kafka_sidecar_outputs_produced",
        "Ack outputs written (with transactions: in committed transactions)",
        labels=["subscription"],
    )
    transactions = CounterMetricFamily(
        "kafka_sidecar_transactions",
        "Output transactions (each with its partition's offset commit), by outcome",
        labels=["subscription", "outcome"],
    )
    latency = SummaryMetricFamily(
        "kafka_sidecar_transaction_seconds",
        "Latency of committed output transactions, begin to commit",
        labels=["subscription"],
    )
    for sub in subs:
        label = sub.name
        nacks.add_metric([label, "retry"], sub.stats.nacked_retry)
        nacks.add_metric([label, "dead_letter"], sub.stats.nacked_dead_letter)
        if not isinstance(sub, GroupSubscription):
            continue
        writer = sub.dead_letters
        dead.add_metric([label], writer.written if writer else 0)
        if writer is not None:
            for cause, count in writer.failures.items():
                dlq_failures.add_metric([label, cause], count)
        ok, failed, _ = _commit_totals(sub)
        commits.add_metric([label, "ok"], ok)
        commits.add_metric([label, "failed"], failed)
        rebalances.add_metric([label], sub.consumer.stats.rebalances)
        out = sub.outputs.stats
        produced.add_metric([label], out.produced)
        if sub.config.transactions.enabled:
            for outcome in ("committed", "aborted", "fenced"):
                transactions.add_metric([label, outcome], getattr(out, outcome))
            latency.add_metric([label], out.committed, out.transaction_seconds)
    yield from (nacks, dead, dlq_failures, commits, rebalances, produced, transactions, latency)


def _commit_totals(sub: GroupSubscription) -> tuple[int, int, float]:
    """(commits, failed commits, seconds of the commits): with transactions, a committed
    transaction is the partition's offset commit, and an aborted or fenced one a failed one."""
    stats = sub.consumer.stats
    ok, failed, seconds = stats.commits, stats.commit_failures, stats.commit_seconds
    if sub.config.transactions.enabled:
        out = sub.outputs.stats
        ok, failed = ok + out.committed, failed + out.aborted + out.fenced
        seconds += out.transaction_seconds
    return ok, failed, seconds


def _gauges(subs: Iterable[Subscription]) -> Iterator[Metric]:
    labels = ["subscription"]
    streams = GaugeMetricFamily("kafka_sidecar_streams", "App streams attached", labels=labels)
    batches = GaugeMetricFamily(
        "kafka_sidecar_in_flight_batches", "Batches out with apps", labels=labels
    )
    records = GaugeMetricFamily(
        "kafka_sidecar_in_flight_records", "Records out with apps", labels=labels
    )
    size = GaugeMetricFamily(
        "kafka_sidecar_in_flight_bytes", "Bytes of records out with apps", labels=labels
    )
    buffered = GaugeMetricFamily(
        "kafka_sidecar_buffered_records", "Records fetched, waiting for a stream", labels=labels
    )
    up = GaugeMetricFamily(
        "kafka_sidecar_subscription_serving", "1 when the subscription is healthy", labels=labels
    )
    window = GaugeMetricFamily(
        "kafka_sidecar_window_limit",
        "Per-stream flow-control window (config caps; an app may ask for less)",
        labels=["subscription", "kind"],
    )
    held = GaugeMetricFamily(
        "kafka_sidecar_keys_held",
        "ordering: key: keys (per partition) whose later records wait for one out with an app, "
        "on its way to the DLQ or waiting out a retry",
        labels=labels,
    )
    stalled = GaugeMetricFamily(
        "kafka_sidecar_partition_stalled",
        "1 when the partition's commit has not moved for stall_after_ms while records are "
        "unsettled or lag > 0 (the log names the record holding it)",
        labels=["subscription", "topic", "partition"],
    )
    by_partition = GaugeMetricFamily(
        "kafka_sidecar_partition_in_flight_records",
        "Records out with apps or on their way to the DLQ, per assigned partition",
        labels=["subscription", "topic", "partition"],
    )
    lag = GaugeMetricFamily(
        "kafka_sidecar_consumer_lag",
        "High watermark minus the committable offset, per assigned partition",
        labels=["subscription", "topic", "partition"],
    )
    for sub in subs:
        name = sub.name
        dispatchers = sub.dispatchers()
        flights = [d.in_flight for d in dispatchers]
        streams.add_metric([name], sum(len(d.streams) for d in dispatchers))
        batches.add_metric([name], sum(f[0] for f in flights))
        records.add_metric([name], sum(f[1] for f in flights))
        size.add_metric([name], sum(f[2] for f in flights))
        buffered.add_metric([name], sum(len(d.flight.backlog) for d in dispatchers))
        held.add_metric([name], sum(d.flight.held_keys for d in dispatchers))
        up.add_metric([name], 1 if sub.serving else 0)
        limits = sub.config.window
        window.add_metric([name, "batches"], limits.max_outstanding_batches)
        window.add_metric([name, "records"], limits.max_outstanding_records)
        window.add_metric([name, "bytes"], limits.max_outstanding_bytes)
        if not isinstance(sub, GroupSubscription):
            continue
        dispatcher = sub.dispatcher
        consumer = sub.consumer.consumer
        for (topic, partition), count in sorted(dispatcher.flight.unsettled_by_partition().items()):
            by_partition.add_metric([name, topic, str(partition)], count)
            stuck = (topic, partition) in sub.stalls.stalled
            stalled.add_metric([name, topic, str(partition)], 1 if stuck else 0)
        for topic, partition in sorted(dispatcher.assigned):
            highwater = consumer.highwater(TopicPartition(topic, partition))
            ledger = dispatcher.ledger.partition((topic, partition))
            if highwater is None or ledger is None:
                continue
            lag.add_metric(
                [name, topic, str(partition)], max(highwater - ledger.commit_offset(), 0)
            )
    yield from (
        streams,
        batches,
        records,
        size,
        buffered,
        held,
        up,
        window,
        lag,
        by_partition,
        stalled,
    )


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def serve(
    address: str,
    subscriptions: Mapping[str, Subscription],
    token_provider: MskIamTokenProvider | None,
) -> None:
    """Starts the /metrics endpoint (a daemon thread) on `host:port`."""
    REGISTRY.register(SidecarCollector(subscriptions, token_provider, asyncio.get_running_loop()))
    host, _, port = address.rpartition(":")
    try:
        start_http_server(int(port), addr=host.strip("[]") or "127.0.0.1")
    except OSError as exc:
        raise OSError(f"listen.metrics: cannot listen on {address}: {exc}") from exc
