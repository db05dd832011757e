"""Dead letters: records the app gave up on, written to the subscription's DLQ topic.

A dead-lettered record is settled only once the broker has confirmed the DLQ write (acks=all,
idempotent producer), so a crash or a failing DLQ never loses it: until then it stays
unsettled in the ledger and the partition's commit stays behind it. Writes that fail are
retried with backoff, in order, for as long as it takes; meanwhile the subscription reports
NOT_SERVING so operators see it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from sidecar.batcher import Pending

log = logging.getLogger("sidecar.deadletters")

HealthCallback = Callable[[bool], Awaitable[None]]


class DeadLetterError(Exception):
    """The DLQ cannot be used at all (e.g. its topic does not exist): a startup error."""


@dataclass(slots=True)
class DeadLetter:
    pending: Pending
    reason: str


def dlq_headers(
    letter: DeadLetter, group_id: str, failed_at_ms: int
) -> list[tuple[str, bytes | None]]:
    """The original headers, in order, then the x-dlq-* headers of docs/DESIGN.md §4.6."""
    message = letter.pending.message
    headers: list[tuple[str, bytes | None]] = list(message.headers)
    extra = {
        "x-dlq-original-topic": message.topic,
        "x-dlq-original-partition": str(message.partition),
        "x-dlq-original-offset": str(message.offset),
        "x-dlq-original-timestamp": str(message.timestamp),
        "x-dlq-consumer-group": group_id,
        "x-dlq-reason": letter.reason,
        "x-dlq-attempts": str(letter.pending.attempts),
        "x-dlq-failed-at": str(failed_at_ms),
    }
    headers.extend((key, value.encode()) for key, value in extra.items())
    return headers


class DeadLetterWriter:
    """Writes one subscription's dead letters, in order, until each is confirmed."""

    def __init__(
        self,
        topic: str,
        group_id: str,
        client_kwargs: dict[str, Any],
        *,
        config_key: str,
    ) -> None:
        self.topic = topic
        self.group_id = group_id
        self._config_key = config_key
        self._producer = AIOKafkaProducer(
            acks="all", enable_idempotence=True, linger_ms=5, **client_kwargs
        )
        self.queue: asyncio.Queue[DeadLetter] = asyncio.Queue()
        self.written = 0
        self.failures = 0

    async def start(self) -> None:
        await self._producer.start()
        try:
            metadata = await self._producer.client.fetch_all_metadata()
        except KafkaError as exc:
            await self._producer.stop()
            raise DeadLetterError(f"{self._config_key}: cannot read topic metadata: {exc}") from exc
        if self.topic not in metadata.topics():
            await self._producer.stop()
            raise DeadLetterError(
                f"{self._config_key}: dead-letter topic {self.topic!r} does not exist; create it "
                "(the sidecar never creates topics)"
            )

    async def stop(self) -> None:
        await self._producer.stop()

    async def run(self, settle: Callable[[Pending], None], set_healthy: HealthCallback) -> None:
        """Writes queued letters; `settle` is called once the broker confirmed each."""
        backoff = 0.5
        healthy = True
        while True:
            letter = await self.queue.get()
            while True:
                try:
                    await self._write(letter)
                except KafkaError as exc:
                    self.failures += 1
                    if healthy:
                        healthy = False
                        await set_healthy(False)
                    log.error(
                        "dead-letter write failed; the record stays unsettled and is retried",
                        extra={**self._where(letter), "error": repr(exc), "retry_in_s": backoff},
                    )
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 30.0)
                    continue
                backoff = 0.5
                if not healthy:
                    healthy = True
                    await set_healthy(True)
                    log.info("dead-letter writes recovered", extra={"dlq_topic": self.topic})
                self.written += 1
                settle(letter.pending)
                break

    async def _write(self, letter: DeadLetter) -> None:
        message = letter.pending.message
        await self._producer.send_and_wait(
            self.topic,
            value=message.value,
            key=message.key,
            headers=dlq_headers(letter, self.group_id, int(time.time() * 1000)),
        )
        log.info("dead-lettered", extra={**self._where(letter), "reason": letter.reason})

    def _where(self, letter: DeadLetter) -> dict[str, object]:
        topic, partition = letter.pending.tp
        return {
            "topic": topic,
            "partition": partition,
            "offset": letter.pending.offset,
            "dlq_topic": self.topic,
        }
