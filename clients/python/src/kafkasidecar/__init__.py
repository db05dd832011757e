"""kafka-sidecar's API for apps: the generated stubs (`kafkasidecar.v1`) and an asyncio client.

    from kafkasidecar import SidecarConsumer

    async with SidecarConsumer("unix:///var/run/kafka-sidecar/sidecar.sock", "receipts") as c:
        async for batch in c:
            ...
            await batch.ack()

See `kafkasidecar.client` for the whole story.
"""

from kafkasidecar import client
from kafkasidecar.client import *  # noqa: F403 - the client's public names are the package's

__version__ = "0.1.0"

__all__ = [*client.__all__, "__version__"]
