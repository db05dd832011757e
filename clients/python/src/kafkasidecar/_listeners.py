"""Who hears a consumer's events: its ``on_*`` callbacks and every ``events()`` iterator.

An event is a rebalance, a refused ack or a sidecar going away; one that nobody hears would
be a silent bug. So each iterator gets every event, events that come before any iterator
exists wait for the first one, and an event without any listener is logged.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from kafkasidecar._events import (
    Callback,
    Draining,
    Event,
    PartitionsAssigned,
    PartitionsRevoked,
    Rejected,
)

# The name the client logged under before its split into modules: apps configure that one.
log = logging.getLogger("kafkasidecar.client")

#: Events that arrive while no `events()` iterator exists are kept (up to this many) for the
#: first one, so an iterator started right after `async with` still sees the first assignment.
UNCLAIMED_EVENTS = 1000

_T = TypeVar("_T")


class EventStream(Generic[_T]):
    """What `consumer.events()` returns: an async iterator of events, ended by the consumer's close.

    It is registered when created, not when first iterated, so no event slips in between.
    `aclose()` it to stop receiving.
    """

    def __init__(self, queue: asyncio.Queue[_T | None], unregister: Callable[[], None]) -> None:
        self._queue = queue
        self._unregister = unregister
        self._done = False

    def __aiter__(self) -> EventStream[_T]:
        return self

    async def __anext__(self) -> _T:
        if self._done:
            raise StopAsyncIteration
        item = await self._queue.get()
        if item is None:
            await self.aclose()
            raise StopAsyncIteration
        return item

    async def aclose(self) -> None:
        if not self._done:
            self._done = True
            self._unregister()


@dataclass
class Listeners:
    on_assigned: Callback[PartitionsAssigned] | None = None
    on_revoked: Callback[PartitionsRevoked] | None = None
    on_rejected: Callback[Rejected] | None = None
    on_draining: Callback[Draining] | None = None
    on_event: Callback[Event] | None = None
    queues: list[asyncio.Queue[Event | None]] = field(default_factory=list)
    unclaimed: collections.deque[Event] = field(
        default_factory=lambda: collections.deque(maxlen=UNCLAIMED_EVENTS)
    )

    def stream(self, *, closed: bool) -> EventStream[Event]:
        """A new iterator, given the events nobody has seen yet; it ends at once if `closed`."""
        queue: asyncio.Queue[Event | None] = asyncio.Queue()
        while self.unclaimed:
            queue.put_nowait(self.unclaimed.popleft())
        if closed:
            queue.put_nowait(None)
        self.queues.append(queue)
        return EventStream(queue, lambda: self.queues.remove(queue))

    async def emit(self, event: Event) -> None:
        """Hands the event to every iterator and callback; a failing callback is only logged."""
        for queue in self.queues:
            queue.put_nowait(event)
        handled = bool(self.queues)
        for callback in (self.specific(event), self.on_event):
            if callback is None:
                continue
            handled = True
            try:
                result = callback(event)
                if result is not None:
                    await result
            except Exception:
                log.exception("event callback failed", extra={"event": repr(event)})
        if not self.queues:
            self.unclaimed.append(event)
        if not handled:
            level = logging.WARNING if isinstance(event, Rejected | Draining) else logging.INFO
            log.log(level, "kafka-sidecar: %s (no listener for this event)", event)

    def end(self) -> None:
        """Ends every iterator: the consumer has closed."""
        for queue in self.queues:
            queue.put_nowait(None)

    def specific(self, event: Event) -> Callback[Any] | None:
        if isinstance(event, PartitionsAssigned):
            return self.on_assigned
        if isinstance(event, PartitionsRevoked):
            return self.on_revoked
        if isinstance(event, Rejected):
            return self.on_rejected
        if isinstance(event, Draining):
            return self.on_draining
        return None
