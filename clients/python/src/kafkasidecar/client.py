"""An asyncio client for kafka-sidecar: ``async for`` over batches, then ack or nack them.

The sidecar beside your app owns Kafka (group membership, MSK IAM auth, retries, dead
letters, commits); the app only says what it has finished. Only acks move committed offsets,
so anything not acked is redelivered: after a crash, a cancel, or a sidecar restart.

A complete consumer::

    import asyncio
    import logging

    from kafkasidecar import PartitionsRevoked, SidecarConsumer, StreamLostError


    async def handle(value: bytes | None) -> None:
        print(value)


    def revoked(event: PartitionsRevoked) -> None:
        # The partitions went to another member; acks for their records are rejected now.
        logging.info("revoked %s", event.partitions)


    async def main() -> None:
        async with SidecarConsumer(
            "unix:///var/run/kafka-sidecar/sidecar.sock",  # or "127.0.0.1:50051"
            "receipts",  # a subscription name from the sidecar's config
            max_outstanding_batches=2,  # the flow-control window of this worker
            on_revoked=revoked,
        ) as consumer:
            async for batch in consumer:
                try:
                    for record in batch:
                        if record.value is None:  # a tombstone
                            await record.ack()
                            continue
                        try:
                            await handle(record.value)
                        except ValueError as exc:  # will never succeed: park it in the DLQ
                            await record.nack(dead_letter=True, reason=str(exc))
                        except Exception:  # may succeed later: redeliver after backoff
                            await record.nack(retry_after_ms=5000)
                    await batch.ack()  # settles every record not settled above
                except StreamLostError:
                    # The sidecar restarted under us: it redelivers this batch on the new
                    # stream, which the consumer has already opened.
                    continue


    asyncio.run(main())

Leaving the ``async with`` block (normally, by an exception, or because the task was
cancelled) drains the stream: the sidecar is told to send nothing more, the stream ends, and
every record not yet settled goes back to the sidecar for redelivery. Nothing is lost.

What surfaces and how:

- Batches: ``async for``. ``batch.records`` are :class:`Record` objects (``batch.pb`` is the
  wire message); settle a whole batch, single records, or a mix (``consumer.ack(...)``).
  Settling twice is harmless: the first settlement wins and later ones send nothing.
- Outputs (consume-transform-produce): ``await batch.ack(outputs=[Output("totals",
  value=...)])`` (or ``record.ack(outputs=...)``, ``consumer.ack(..., outputs=...)``) has
  the sidecar produce those records for the ones the ack settles, which it settles only once
  the outputs are written: at least once, or exactly once in one Kafka transaction with the
  offsets' commit when the subscription has ``transactions.enabled``
  (``consumer.opened.transactional``). See :class:`Output`.
- Rebalances, rejected acks, sidecar shutdown, (re)connects: typed events
  (:class:`PartitionsAssigned`, :class:`PartitionsRevoked`, :class:`Rejected`,
  :class:`Draining`, :class:`CaughtUp`, :class:`Connected`, :class:`Disconnected`), delivered
  to the ``on_*`` callbacks and to every ``consumer.events()`` iterator. An event nobody
  listens to is logged, a :class:`Rejected` one as a warning, so none passes unseen.
- Sidecar restarts: the consumer reopens its stream with exponential backoff and goes on.
  A batch from the old stream cannot be settled any more (the sidecar already took its
  records back): its ``ack``/``nack`` raise :class:`StreamLostError`.
- Fatal stream errors (unknown subscription, wrong token, ...) end the ``async for`` with
  :class:`StreamError`; giving up on an unreachable sidecar raises
  :class:`SidecarUnavailableError`.
"""

# What this guide describes is defined in the package's private modules (`_client`,
# `_models`, `_events`, ...) and exported by `kafkasidecar`. This module re-exports it, so
# that `from kafkasidecar.client import ...` keeps working, and keeps the guide that
# docs/clients.md links to.

import kafkasidecar
from kafkasidecar import *  # noqa: F403 - every public name of the package

# The version is the package's: `from kafkasidecar.client import *` never brought it.
__all__ = [name for name in kafkasidecar.__all__ if name != "__version__"]
