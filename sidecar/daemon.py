"""`kafka-sidecar run`: wires config → consumers → dispatchers → gRPC server, and owns the
process lifecycle (startup checks, group membership that follows the app's streams, signals,
graceful shutdown)."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import time
from typing import Any

from aiokafka.errors import KafkaError

from sidecar import logs, metrics, permissions
from sidecar.auth import AuthError, MskIamTokenProvider, client_kwargs
from sidecar.config import SidecarConfig, SubscriptionConfig
from sidecar.deadletters import DeadLetterError, DeadLetterWriter
from sidecar.server import Server
from sidecar.subscription import GroupSubscription, SnapshotSubscription, Subscription
from sidecar.tracing import Tracing, TracingUnavailable

log = logging.getLogger("sidecar.daemon")

#: Exit codes: 0 clean shutdown, 1 runtime failure (e.g. no AWS credentials). A bad config
#: (2) never gets this far: the CLI rejects it.
EXIT_OK, EXIT_FAILURE = 0, 1


def run_daemon(config: SidecarConfig) -> int:
    """Runs until SIGTERM/SIGINT; returns the process exit code."""
    logs.configure(config.log.level, config.log.format)
    return asyncio.run(Sidecar(config).serve())


class Sidecar:
    def __init__(self, config: SidecarConfig) -> None:
        self.config = config
        self._stop = asyncio.Event()
        self._signals = 0
        self._crashed = False
        self._tracing: Tracing | None = None

    def _on_task_done(self, task: asyncio.Task[None]) -> None:
        """A background task must never end on its own: if one does, shut down (exit 1)
        rather than keep serving with a piece missing."""
        if task.cancelled():
            return
        exc = task.exception()
        log.error(
            "internal error: %s ended; shutting down",
            task.get_name(),
            exc_info=(type(exc), exc, exc.__traceback__) if exc else None,
        )
        self._crashed = True
        self._stop.set()

    def _on_signal(self, signum: int) -> None:
        self._signals += 1
        if self._signals > 1:
            log.warning("second signal: exiting at once", extra={"signal": signum})
            logging.shutdown()
            os._exit(EXIT_FAILURE)
        log.info("shutting down", extra={"signal": signal.Signals(signum).name})
        self._stop.set()

    async def serve(self) -> int:
        config = self.config
        # Missing permissions are worded for IAM (with this region) or for Kafka ACLs.
        permissions.configure(config.kafka)
        token_provider = None
        if config.kafka.sasl_mechanism == "AWS_MSK_IAM":
            token_provider = MskIamTokenProvider(config.kafka.aws)
            try:
                await token_provider.check()
            except AuthError as exc:
                log.error(str(exc))
                return EXIT_FAILURE
        kwargs = client_kwargs(config.kafka, token_provider)
        try:
            self._tracing = Tracing(config.tracing) if config.tracing.otlp_endpoint else None
        except TracingUnavailable as exc:
            log.error(str(exc))
            return EXIT_FAILURE

        subscriptions: dict[str, Subscription] = {}
        server: Server | None = None
        try:
            for index, sub in enumerate(config.subscriptions):
                subscriptions[sub.name] = await self._subscription(index, sub, kwargs)
            auth_token = config.listen.auth_token
            server = Server(
                config.listen.grpc,
                subscriptions,
                auth_token.get_secret_value() if auth_token else None,
                health_address=config.listen.health,
                unix_socket_mode=config.listen.unix_socket_mode,
                unix_socket_group=config.listen.unix_socket_group,
            )
            await server.start()
            if config.listen.metrics:
                metrics.serve(config.listen.metrics, subscriptions, token_provider)
        except (DeadLetterError, OSError) as exc:
            log.error(str(exc))
            for started in subscriptions.values():
                await started.stop()
            if server is not None:
                await server.stop(grace_s=0)
            return EXIT_FAILURE

        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_signal, signum)

        running: list[asyncio.Task[None]] = []
        settling: list[asyncio.Task[None]] = []
        for subscription in subscriptions.values():
            health = functools.partial(server.set_health, subscription.name)
            running.append(
                asyncio.create_task(subscription.run(health), name=f"{subscription.name} run")
            )
            settling.append(
                asyncio.create_task(subscription.settle(health), name=f"{subscription.name} settle")
            )
        for task in running + settling:
            task.add_done_callback(self._on_task_done)
        try:
            await self._stop.wait()
            await self._shutdown(subscriptions, server, running)
        finally:
            for task in running + settling:
                task.cancel()
            await asyncio.gather(*running, *settling, return_exceptions=True)
            for subscription in subscriptions.values():
                await subscription.stop()
            if token_provider is not None:
                await token_provider.close()
            if self._tracing is not None:
                self._tracing.shutdown()
        log.info("stopped")
        return EXIT_FAILURE if self._crashed else EXIT_OK

    async def _subscription(
        self, index: int, sub: SubscriptionConfig, kwargs: dict[str, Any]
    ) -> Subscription:
        if sub.mode == "snapshot":
            return SnapshotSubscription(sub, kwargs, self._tracing)
        writer = None
        if sub.dead_letter is not None:
            writer = DeadLetterWriter(
                sub.dead_letter.topic,
                sub.group_id or "",
                kwargs,
                config_key=f"subscriptions[{index}].dead_letter.topic",
                subscription=sub.name,
            )
            try:
                await writer.start()
            except KafkaError as exc:
                # Not a configuration error: a sidecar that starts before the brokers can be
                # reached (or while they refuse it) serves, NOT_SERVING, and checks again.
                log.warning(
                    "cannot check the dead-letter topic yet; the subscription checks it before "
                    "it joins its group",
                    extra={"subscription": sub.name, "dlq_topic": writer.topic, "error": repr(exc)},
                )
        return GroupSubscription(sub, kwargs, writer, self._tracing)

    async def _shutdown(
        self,
        subscriptions: dict[str, Subscription],
        server: Server,
        running: list[asyncio.Task[None]],
    ) -> None:
        """Drain, settle, commit, leave the group: what the app acked during the grace is
        committed, so a restarted sidecar does not redeliver it."""
        grace_ms = self.config.shutdown_grace_ms
        server.service.shutting_down = True
        # Stop fetching and sending; acks keep flowing through the still-open streams
        # meanwhile, dead letters keep being written and commits keep being made.
        for sub in subscriptions.values():
            sub.close(grace_ms)
        deadline = time.monotonic() + grace_ms / 1000
        while time.monotonic() < deadline and any(  # noqa: ASYNC110 - a bounded settle wait
            s.unsettled for s in subscriptions.values()
        ):
            await asyncio.sleep(0.05)
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        for sub in subscriptions.values():
            await sub.stop()
            sub.end_streams()
        await server.stop(grace_s=1.0)
