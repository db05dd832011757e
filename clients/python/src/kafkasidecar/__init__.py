"""kafka-sidecar's API for apps: the generated stubs (`kafkasidecar.v1`) and an asyncio client.

    from kafkasidecar import SidecarConsumer

    async with SidecarConsumer("unix:///var/run/kafka-sidecar/sidecar.sock", "receipts") as c:
        async for batch in c:
            ...
            await batch.ack()  # or batch.ack(outputs=[Output("topic", value=...)])

See `kafkasidecar.client` for the whole story.
"""

from kafkasidecar._client import SidecarConsumer
from kafkasidecar._events import (
    CaughtUp,
    Connected,
    Disconnected,
    Draining,
    Event,
    PartitionsAssigned,
    PartitionsRevoked,
    Rejected,
    RejectReason,
)
from kafkasidecar._exceptions import (
    SidecarError,
    SidecarUnavailableError,
    StreamError,
    StreamLostError,
)
from kafkasidecar._listeners import EventStream
from kafkasidecar._models import Batch, Output, Record, RecordRef, TopicPartition

__version__ = "0.1.0"

__all__ = [
    "Batch",
    "CaughtUp",
    "Connected",
    "Disconnected",
    "Draining",
    "Event",
    "EventStream",
    "Output",
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

# `import kafkasidecar` has always made `kafkasidecar.client` available too. Last, because
# that module re-exports the names above.
from kafkasidecar import client as client
