"""kafka-sidecar's API for apps: the generated stubs (`kafkasidecar.v1`) and an asyncio client.

    from kafkasidecar import SidecarConsumer

    async with SidecarConsumer("unix:///var/run/kafka-sidecar/sidecar.sock", "receipts") as c:
        async for batch in c:
            ...
            await batch.ack()

See `kafkasidecar.client` for the whole story.
"""

from kafkasidecar.client import (
    Batch,
    CaughtUp,
    Connected,
    Disconnected,
    Draining,
    Event,
    EventStream,
    PartitionsAssigned,
    PartitionsRevoked,
    Record,
    RecordRef,
    Rejected,
    RejectReason,
    SidecarConsumer,
    SidecarError,
    SidecarUnavailableError,
    StreamError,
    StreamLostError,
    TopicPartition,
)

__version__ = "0.1.0"

__all__ = [
    "Batch",
    "CaughtUp",
    "Connected",
    "Disconnected",
    "Draining",
    "Event",
    "EventStream",
    "PartitionsAssigned",
    "PartitionsRevoked",
    "Record",
    "RecordRef",
    "RejectReason",
    "Rejected",
    "SidecarConsumer",
    "SidecarError",
    "SidecarUnavailableError",
    "StreamError",
    "StreamLostError",
    "TopicPartition",
    "__version__",
]
