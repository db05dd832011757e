"""One stream to the sidecar: a channel and one Consume call, from open to end.

A consumer outlives its streams (it reopens one when the sidecar restarts), but what was
delivered on a stream can only be settled on that stream. So each stream is an object of its
own, which batches keep and which says, once it has ended, why they cannot be settled.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

import grpc

from kafkasidecar._exceptions import StreamLostError
from kafkasidecar.v1 import consumer_pb2 as pb
from kafkasidecar.v1 import consumer_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from kafkasidecar._models import Batch


class Connection:
    """One channel and one Consume call: opened, read by the consumer's task, then gone.

    Requests go through a queue that the call's request iterator drains, so a caller that is
    cancelled mid-ack never cancels the RPC; each caller's future resolves once gRPC has
    taken its message, or fails when the stream ends first.
    """

    def __init__(
        self,
        target: str,
        open_request: pb.ConsumeRequest,
        *,
        credentials: grpc.ChannelCredentials | None,
        channel_options: Sequence[tuple[str, Any]],
        metadata: tuple[tuple[str, str], ...] | None,
    ) -> None:
        self.target = target
        if credentials is not None:
            self.channel = grpc.aio.secure_channel(target, credentials, options=channel_options)
        else:
            self.channel = grpc.aio.insecure_channel(target, options=channel_options)
        self._outbox: asyncio.Queue[tuple[pb.ConsumeRequest, asyncio.Future[None] | None] | None]
        self._outbox = asyncio.Queue()
        self._outbox.put_nowait((open_request, None))
        self._pending: set[asyncio.Future[None]] = set()
        self._writing = True
        self.lost: str | None = None
        self.stream_id = ""
        #: Whether the stream's subscription writes ack outputs in Kafka transactions (from
        #: `opened`): an ack with outputs must then name records of one partition only.
        self.transactional = False
        self.call: Any = pb_grpc.ConsumerServiceStub(self.channel).Consume(
            self._requests(), metadata=metadata
        )

    @property
    def alive(self) -> bool:
        return self.lost is None and self._writing

    async def _requests(self) -> AsyncIterator[pb.ConsumeRequest]:
        while (item := await self._outbox.get()) is not None:
            request, taken = item
            yield request
            # Resumed only after gRPC wrote the request: now the caller may go on.
            if taken is not None and not taken.done():
                taken.set_result(None)

    async def send(self, request: pb.ConsumeRequest, batch: Batch | None = None) -> None:
        """Queues a request and waits until gRPC has taken it; StreamLostError if it cannot."""
        if not self.alive:
            raise self._lost_error(batch)
        taken: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.add(taken)
        taken.add_done_callback(self._pending.discard)
        self._outbox.put_nowait((request, taken))
        await taken

    def end_writing(self) -> None:
        """Half-closes the stream: the sidecar detaches it and takes back what it held."""
        if self._writing:
            self._writing = False
            self._outbox.put_nowait(None)

    def mark_lost(self, why: str) -> None:
        self.lost = why
        self._writing = False
        for taken in list(self._pending):
            if not taken.done():
                taken.set_exception(self._lost_error(None))

    def _lost_error(self, batch: Batch | None) -> StreamLostError:
        what = f"batch {batch.id}" if batch is not None else "request"
        why = self.lost or "the consumer closed it"
        return StreamLostError(
            f"cannot settle {what}: stream {self.stream_id or '(unopened)'} to {self.target} "
            f"has ended ({why}); the sidecar redelivers its unsettled records"
        )

    async def close(self) -> None:
        self.call.cancel()
        await self.channel.close()
