"""`kafka-sidecar run`: wires config → consumers → dispatchers → gRPC server, and owns the
process lifecycle (startup checks, signals, graceful shutdown)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from dataclasses import dataclass

from sidecar import logs
from sidecar.auth import AuthError, MskIamTokenProvider, client_kwargs
from sidecar.config import SidecarConfig, SubscriptionConfig
from sidecar.consumer import GroupConsumer
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

        subscriptions = {}
        for sub in config.subscriptions:
            ledger = Ledger()
            dispatcher = Dispatcher(sub, ledger, group_id=sub.group_id or "")
            subscriptions[sub.name] = Subscription(
                sub, dispatcher, GroupConsumer(sub, dispatcher, ledger, kwargs)
            )
        auth_token = config.listen.auth_token
        server = Server(
            config.listen.grpc,
            {name: s.dispatcher for name, s in subscriptions.items()},
            auth_token.get_secret_value() if auth_token else None,
        )
        try:
            await server.start()
        except OSError as exc:
            log.error(str(exc))
            return EXIT_FAILURE

        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_signal, signum)

        tasks: list[asyncio.Task[None]] = []
        for subscription in subscriptions.values():
            tasks.append(asyncio.create_task(subscription.dispatcher.run()))
            tasks.append(asyncio.create_task(self._consume(subscription, server)))
        try:
            await self._stop.wait()
            await self._shutdown(subscriptions, server, tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if token_provider is not None:
                await token_provider.close()
        log.info("stopped")
        return EXIT_OK

    async def _consume(self, sub: Subscription, server: Server) -> None:
        """Joins the group (retrying while the brokers are unreachable), then polls and commits."""
        backoff = 1.0
        while True:
            try:
                await sub.consumer.start()
                break
            except Exception as exc:
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
        await server.set_health("", serving=True)
        log.info(
            "consuming",
            extra={
                "subscription": sub.config.name,
                "group_id": sub.config.group_id,
                "topics": sub.config.topics,
            },
        )
        await asyncio.gather(sub.consumer.run(), sub.consumer.commit_loop())

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
        # Stop fetching; acks keep flowing through the still-open streams meanwhile.
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        deadline = time.monotonic() + grace_ms / 1000
        while time.monotonic() < deadline and any(  # noqa: ASYNC110 - a bounded settle wait
            s.dispatcher.in_flight[1] for s in subscriptions.values()
        ):
            await asyncio.sleep(0.05)
        for sub in subscriptions.values():
            with contextlib.suppress(Exception):
                await sub.consumer.stop()
            sub.dispatcher.end_streams()
        await server.stop(grace_s=1.0)
