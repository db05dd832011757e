"""`kafka-sidecar run`: wires config → consumers → dispatchers → gRPC server, and owns the
process lifecycle (startup checks, group membership that follows the app's streams, signals,
graceful shutdown)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from dataclasses import dataclass

from sidecar import logs, metrics
from sidecar.auth import AuthError, MskIamTokenProvider, client_kwargs
from sidecar.config import SidecarConfig, SubscriptionConfig
from sidecar.consumer import GroupConsumer
from sidecar.deadletters import DeadLetterError, DeadLetterWriter
from sidecar.dispatcher import Dispatcher
from sidecar.ledger import Ledger
from sidecar.server import Server

log = logging.getLogger("sidecar.daemon")

#: Exit codes: 0 clean shutdown, 1 runtime failure (e.g. no AWS credentials), 2 bad config.
EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2


@dataclass
class Subscription:
    config: SubscriptionConfig
    dispatcher: Dispatcher
    consumer: GroupConsumer
    dead_letters: DeadLetterWriter | None


def run_daemon(config: SidecarConfig) -> int:
    """Runs until SIGTERM/SIGINT; returns the process exit code."""
    logs.configure(config.log.level, config.log.format)
    return asyncio.run(Sidecar(config).serve())


class Sidecar:
    def __init__(self, config: SidecarConfig) -> None:
        self.config = config
        self._stop = asyncio.Event()
        self._signals = 0

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
        unsupported = [
            f"subscriptions[{i}].mode: {s.mode!r} is not supported by this version"
            for i, s in enumerate(config.subscriptions)
            if s.mode != "group"
        ]
        if unsupported:
            for message in unsupported:
                log.error(message)
            return EXIT_CONFIG

        token_provider = None
        if config.kafka.sasl_mechanism == "AWS_MSK_IAM":
            token_provider = MskIamTokenProvider(config.kafka.aws)
            try:
                await token_provider.check()
            except AuthError as exc:
                log.error(str(exc))
                return EXIT_FAILURE
        kwargs = client_kwargs(config.kafka, token_provider)

        subscriptions: dict[str, Subscription] = {}
        try:
            for index, sub in enumerate(config.subscriptions):
                writer = None
                if sub.dead_letter is not None:
                    writer = DeadLetterWriter(
                        sub.dead_letter.topic,
                        sub.group_id or "",
                        kwargs,
                        config_key=f"subscriptions[{index}].dead_letter.topic",
                    )
                    await writer.start()
                ledger = Ledger()
                dispatcher = Dispatcher(
                    sub,
                    ledger,
                    group_id=sub.group_id or "",
                    dead_letters=writer.queue if writer else None,
                )
                subscriptions[sub.name] = Subscription(
                    sub, dispatcher, GroupConsumer(sub, dispatcher, ledger, kwargs), writer
                )
        except DeadLetterError as exc:
            log.error(str(exc))
            await self._stop_writers(subscriptions)
            return EXIT_FAILURE

        auth_token = config.listen.auth_token
        server = Server(
            config.listen.grpc,
            {name: s.dispatcher for name, s in subscriptions.items()},
            auth_token.get_secret_value() if auth_token else None,
        )
        try:
            await server.start()
            if config.listen.metrics:
                metrics.serve(config.listen.metrics, subscriptions, token_provider, server.serving)
        except OSError as exc:
            log.error(str(exc))
            await self._stop_writers(subscriptions)
            return EXIT_FAILURE

        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_signal, signum)

        tasks: list[asyncio.Task[None]] = []
        dlq_tasks: list[asyncio.Task[None]] = []
        for subscription in subscriptions.values():
            tasks.append(asyncio.create_task(subscription.dispatcher.run()))
            tasks.append(asyncio.create_task(self._supervise(subscription, server)))
            if subscription.dead_letters is not None:
                dlq_tasks.append(
                    asyncio.create_task(self._write_dead_letters(subscription, server))
                )
        try:
            await self._stop.wait()
            await self._shutdown(subscriptions, server, tasks)
        finally:
            for task in tasks + dlq_tasks:
                task.cancel()
            await asyncio.gather(*tasks, *dlq_tasks, return_exceptions=True)
            await self._stop_writers(subscriptions)
            if token_provider is not None:
                await token_provider.close()
        log.info("stopped")
        return EXIT_OK

    @staticmethod
    async def _stop_writers(subscriptions: dict[str, Subscription]) -> None:
        for sub in subscriptions.values():
            if sub.dead_letters is not None:
                with contextlib.suppress(Exception):
                    await sub.dead_letters.stop()

    async def _write_dead_letters(self, sub: Subscription, server: Server) -> None:
        assert sub.dead_letters is not None

        async def set_healthy(ok: bool) -> None:
            await server.set_health(sub.config.name, serving=ok)

        await sub.dead_letters.run(sub.dispatcher.dead_lettered, set_healthy)

    async def _supervise(self, sub: Subscription, server: Server) -> None:
        """Group membership follows the app: joined while a stream is attached (and at
        start), left after `detach_timeout_ms` without one so other pods take the
        partitions, joined again when a stream attaches."""
        dispatcher = sub.dispatcher
        while True:
            await self._start_consumer(sub, server)
            work = asyncio.gather(sub.consumer.run(), sub.consumer.commit_loop())
            try:
                await self._wait_detached(dispatcher, sub.config.detach_timeout_ms / 1000)
            finally:
                work.cancel()
                await asyncio.gather(work, return_exceptions=True)
            await sub.consumer.stop()
            log.info(
                "no stream attached: left the group until one attaches",
                extra={
                    "subscription": sub.config.name,
                    "detach_timeout_ms": sub.config.detach_timeout_ms,
                },
            )
            while not dispatcher.streams:
                dispatcher.streams_changed.clear()
                await dispatcher.streams_changed.wait()

    @staticmethod
    async def _wait_detached(dispatcher: Dispatcher, timeout_s: float) -> None:
        """Returns once no stream has been attached for `timeout_s`."""
        while True:
            dispatcher.streams_changed.clear()
            if dispatcher.streams:
                await dispatcher.streams_changed.wait()
                continue
            try:
                async with asyncio.timeout(timeout_s):
                    await dispatcher.streams_changed.wait()
            except TimeoutError:
                return

    async def _start_consumer(self, sub: Subscription, server: Server) -> None:
        """Joins the group, retrying while the brokers are unreachable."""
        backoff = 1.0
        while True:
            try:
                await sub.consumer.start()
                break
            except Exception as exc:
                await server.set_health(sub.config.name, serving=False)
                log.error(
                    "cannot start consumer; retrying",
                    extra={
                        "subscription": sub.config.name,
                        "error": repr(exc),
                        "retry_in_s": backoff,
                    },
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
        await server.set_health(sub.config.name, serving=True)
        log.info(
            "consuming",
            extra={
                "subscription": sub.config.name,
                "group_id": sub.config.group_id,
                "topics": sub.config.topics,
            },
        )

    async def _shutdown(
        self,
        subscriptions: dict[str, Subscription],
        server: Server,
        tasks: list[asyncio.Task[None]],
    ) -> None:
        """Drain, settle, commit, leave the group: what the app acked during the grace is
        committed, so a restarted sidecar does not redeliver it."""
        grace_ms = self.config.shutdown_grace_ms
        server.service.shutting_down = True
        for sub in subscriptions.values():
            sub.dispatcher.close(grace_ms)
        # Stop fetching; acks keep flowing through the still-open streams meanwhile, and
        # dead letters keep being written.
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        deadline = time.monotonic() + grace_ms / 1000
        while time.monotonic() < deadline and any(  # noqa: ASYNC110 - a bounded settle wait
            s.dispatcher.unsettled for s in subscriptions.values()
        ):
            await asyncio.sleep(0.05)
        for sub in subscriptions.values():
            with contextlib.suppress(Exception):
                await sub.consumer.stop()
            sub.dispatcher.end_streams()
        await server.stop(grace_s=1.0)
