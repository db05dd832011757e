"""The smallest useful app: consume through kafka-sidecar with the plain generated stubs.

It opens a stream for one subscription, prints each batch and acks it. Nothing here knows
about Kafka, AWS or offsets: the sidecar owns all of that, and commits what was acked.

    python examples/python/consumer.py --target unix:///tmp/sidecar.sock --subscription receipts
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator

import grpc

from kafkasidecar.v1 import consumer_pb2 as pb
from kafkasidecar.v1 import consumer_pb2_grpc as pb_grpc


async def consume(
    target: str, subscription: str, idle_exit_s: float | None, token: str | None
) -> int:
    requests: asyncio.Queue[pb.ConsumeRequest] = asyncio.Queue()
    requests.put_nowait(
        pb.ConsumeRequest(open=pb.Open(subscription=subscription, client_id="example-app"))
    )

    async def outgoing() -> AsyncIterator[pb.ConsumeRequest]:
        while True:
            yield await requests.get()

    metadata = [("authorization", f"Bearer {token}")] if token else None
    total = 0
    async with grpc.aio.insecure_channel(target) as channel:
        call = pb_grpc.ConsumerServiceStub(channel).Consume(outgoing(), metadata=metadata)
        while True:
            try:
                response = await asyncio.wait_for(call.read(), idle_exit_s)
            except TimeoutError:
                print(f"no batch for {idle_exit_s:g}s: done, {total} records acked")
                call.cancel()
                return total
            if response is grpc.aio.EOF:
                return total
            kind = response.WhichOneof("kind")
            if kind == "opened":
                opened = response.opened
                print(f"opened {opened.subscription!r}: group {opened.group_id}, v{opened.version}")
            elif kind == "batch":
                batch = response.batch
                first, last = batch.records[0], batch.records[-1]
                print(
                    f"batch {batch.batch_id}: {len(batch.records)} records, "
                    f"first {first.topic}[{first.partition}]@{first.offset} {first.value[:60]!r}, "
                    f"last {last.topic}[{last.partition}]@{last.offset}"
                )
                # Process the batch here; ack only what is done. A crash before this line
                # means the sidecar redelivers the batch: at-least-once.
                requests.put_nowait(pb.ConsumeRequest(ack=pb.Ack(batch_ids=[batch.batch_id])))
                total += len(batch.records)
            elif kind in ("partitions_assigned", "partitions_revoked"):
                parts = getattr(response, kind).partitions
                print(
                    f"{kind.replace('_', ' ')}: "
                    + ", ".join(f"{p.topic}[{p.partition}]" for p in parts)
                )
            elif kind == "draining":
                print(f"sidecar shutting down; {response.draining.deadline_ms} ms to settle")
            else:
                print(f"{kind}: {getattr(response, kind)}".strip())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--target", default="127.0.0.1:50051", help="sidecar address (host:port or unix:///path)"
    )
    parser.add_argument(
        "--subscription", required=True, help="a subscription name from the sidecar config"
    )
    parser.add_argument(
        "--idle-exit",
        type=float,
        default=None,
        metavar="SECONDS",
        help="exit after this long without a batch",
    )
    parser.add_argument("--token", default=None, help="bearer token, if the sidecar requires one")
    args = parser.parse_args()
    asyncio.run(consume(args.target, args.subscription, args.idle_exit, args.token))


if __name__ == "__main__":
    main()
