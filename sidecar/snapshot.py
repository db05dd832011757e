"""`mode: snapshot`: a private read of a (compacted) topic for each stream.

Services that rebuild an in-memory index (brands, categories) need every record from the
beginning on every start, a signal once they have it all, then live updates. No consumer
group and no commits: each stream gets its own reader, from the first offset of every
partition. `caught_up` goes out once every partition's position reached the end offset taken
when the read started and everything before it was sent to the stream. Position, not last
offset + 1: compaction gaps and transaction markers would otherwise hang it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiokafka import TopicPartition

from kafkasidecar.v1 import consumer_pb2 as pb
from sidecar.config import SubscriptionConfig
from sidecar.consumer import Fetcher, close_consumer, transcoding_consumer
from sidecar.dispatcher import Dispatcher, Stream

log = logging.getLogger("sidecar.snapshot")

#: How often to look for partitions added to the topics.
PARTITION_CHECK_S = 5.0


class SnapshotReader:
    """Feeds one stream's dispatcher from the start of every partition, then tails."""

    def __init__(
        self,
        config: SubscriptionConfig,
        dispatcher: Dispatcher,
        stream: Stream,
        client_kwargs: dict[str, Any],
    ) -> None:
        self.config = config
        self.dispatcher = dispatcher
        self.stream = stream
        self.consumer = transcoding_consumer(
            keys=config.ordering == "key",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_bytes=config.consumer.fetch_max_bytes,
            max_partition_fetch_bytes=config.consumer.max_partition_fetch_bytes,
            isolation_level=config.consumer.isolation_level,
            **client_kwargs,
        )
        #: End offsets taken at start; a partition leaves this map once caught up.
        self._catching_up: dict[TopicPartition, int] = {}
        self._ends: dict[TopicPartition, int] = {}
        self.caught_up = False

    async def run(self) -> None:
        await self.consumer.start()
        try:
            await self._assign(await self._partitions())
            await self._read()
        finally:
            await close_consumer(self.consumer)

    async def _partitions(self) -> set[TopicPartition]:
        await self.consumer._client.force_metadata_update()
        return {
            TopicPartition(topic, partition)
            for topic in self.config.topics
            for partition in self.consumer.partitions_for_topic(topic) or ()
        }

    async def _assign(self, partitions: set[TopicPartition]) -> None:
        """(Re)assigns, keeping the positions of partitions already being read: new ones
        start from their beginning and must be caught up with too."""
        known = self.consumer.assignment()
        new = partitions - known
        if not new:
            return
        positions = {tp: await self.consumer.position(tp) for tp in known}
        self.consumer.assign(list(partitions))
        for tp, offset in positions.items():
            self.consumer.seek(tp, offset)
        await self.consumer.seek_to_beginning(*new)
        ends = await self.consumer.end_offsets(list(new))
        self._ends.update(ends)
        if not self.caught_up:
            self._catching_up.update(ends)
        self.dispatcher.assign((tp.topic, tp.partition) for tp in new)
        log.info(
            "snapshot reading",
            extra={
                "subscription": self.config.name,
                "stream": self.stream.id,
                "partitions": sorted((tp.topic, tp.partition) for tp in new),
            },
        )

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        next_check = loop.time() + PARTITION_CHECK_S

        async def after_poll() -> None:
            nonlocal next_check
            await self._check_caught_up()
            if loop.time() >= next_check:
                next_check = loop.time() + PARTITION_CHECK_S
                await self._assign(await self._partitions())

        await self._check_caught_up()
        await Fetcher(self.consumer, self.dispatcher, self.config).run(after_poll=after_poll)

    async def _check_caught_up(self) -> None:
        if self.caught_up:
            return
        for tp, end in list(self._catching_up.items()):
            lowest = self.dispatcher.flight.backlog.lowest_offset((tp.topic, tp.partition))
            sent_all = lowest is None or lowest >= end
            if sent_all and await self.consumer.position(tp) >= end:
                del self._catching_up[tp]
        if self._catching_up:
            return
        self.caught_up = True
        # After every batch before it in the stream's outbox: the app has it all once it
        # reads this.
        self.stream.send(
            pb.ConsumeResponse(
                caught_up=pb.CaughtUp(
                    end_offsets=[
                        pb.TopicPartitionOffset(topic=tp.topic, partition=tp.partition, offset=end)
                        for tp, end in sorted(self._ends.items())
                    ]
                )
            )
        )
        log.info(
            "snapshot caught up",
            extra={"subscription": self.config.name, "stream": self.stream.id},
        )
