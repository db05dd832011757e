"""Throughput of the transcoder against the current path, on 1 MiB fetches of 1 KiB records.

    .venv/bin/python bench/transcoder.py [--batch-bytes 16384] [--seconds 1.5]

For each codec (none, lz4, zstd), one fetch of ~1 MiB of records (before compression), in
batches of ~16 KiB (the Java producer's default batch.size), each record a 16-byte key, a
1,000-byte JSON-ish value and a `traceparent` header. Paths, each from the fetch's bytes to
the serialized `ConsumeResponse` with one `Batch` of all the records:

- current: the sidecar's path before the transcoder: aiokafka's PartitionRecords over
  MemoryRecords (its fetcher's parse, Cython), a flow-control size per record, protobuf built
  field by field, SerializeToString;
- compiled / pure: `transcode`, then `batch_bytes(response=True)` over the fetch as one run; and
  `transcode` alone.

Prints records/s and µs/record (best of several runs). Timing only: nothing is asserted.
"""

from __future__ import annotations

import argparse
import random
import struct
import time
from collections.abc import Callable

from aiokafka.codec import lz4_encode, zstd_encode
from aiokafka.consumer.fetcher import READ_UNCOMMITTED, PartitionRecords
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.record.memory_records import MemoryRecords
from aiokafka.record.util import calc_crc32c
from aiokafka.structs import TopicPartition

from kafkasidecar.v1 import consumer_pb2 as pb
from tests.test_transcoder import flow_control_size, protobuf_batch

TOPIC, PARTITION = "bench-topic", 3
RECORD_BYTES = 1024
FETCH_BYTES = 1 << 20
CODECS: dict[str, tuple[int, Callable[[bytes], bytes] | None]] = {
    "none": (0, None),
    "lz4": (3, lz4_encode),
    "zstd": (4, zstd_encode),
}
WORDS = [
    "order",
    "customer",
    "item",
    "price",
    "quantity",
    "status",
    "shipped",
    "pending",
    "region",
    "store",
]


def value(rng: random.Random) -> bytes:
    """~1,000 bytes of JSON-ish text: compresses about as well as real payloads do."""
    parts: list[str] = []
    while sum(map(len, parts)) < 980:
        parts.append(f'"{rng.choice(WORDS)}":"{rng.choice(WORDS)}-{rng.randrange(10**6)}",')
    return ("{" + "".join(parts))[:999].encode() + b"}"


def fetch(codec: str, batch_bytes: int, seed: int = 1) -> tuple[bytes, int]:
    """The fetch's bytes and its record count."""
    rng = random.Random(seed)
    attr, encode = CODECS[codec]
    out, offset, records = bytearray(), 0, 0
    while records * RECORD_BYTES < FETCH_BYTES:
        builder = DefaultRecordBatchBuilder(2, 0, 0, -1, -1, -1, 1 << 30)
        delta = 0
        while delta * RECORD_BYTES < batch_bytes and records * RECORD_BYTES < FETCH_BYTES:
            trace = f"00-{rng.getrandbits(128):032x}-{rng.getrandbits(64):016x}-01".encode()
            builder.append(
                delta,
                1_700_000_000_000 + records,
                b"key-%012d" % rng.randrange(10**12),
                value(rng),
                [("traceparent", trace)],
            )
            delta += 1
            records += 1
        buf = bytearray(builder.build())
        if encode is not None:
            buf[61:] = encode(bytes(buf[61:]))
            struct.pack_into(">h", buf, 21, attr)
        struct.pack_into(">q", buf, 0, offset)
        struct.pack_into(">i", buf, 8, len(buf) - 12)
        struct.pack_into(">I", buf, 17, calc_crc32c(bytes(buf[21:])))
        out += buf
        offset += delta
    return bytes(out), records


def current(data: bytes) -> bytes:
    """The sidecar's path before the transcoder: aiokafka's records, a size per record (the
    state machine's object per record), protobuf built field by field."""
    tp = TopicPartition(TOPIC, PARTITION)
    parsed = list(
        PartitionRecords(tp, MemoryRecords(data), None, 0, None, None, True, READ_UNCOMMITTED)
    )
    sum(map(flow_control_size, parsed))
    return pb.ConsumeResponse(batch=protobuf_batch(1, parsed, lambda _: 1)).SerializeToString()


def via(module: object, *, whole: bool) -> Callable[[bytes], object]:
    transcode = module.transcode  # type: ignore[attr-defined]
    batch_bytes = module.batch_bytes  # type: ignore[attr-defined]

    def run(data: bytes) -> object:
        result = transcode(data, TOPIC, PARTITION, fetch_offset=0, aborted=None)
        if not whole:
            return result
        return batch_bytes(1, [(result.wire, result.ends, 0, len(result), 1)], response=True)

    return run


def best(fn: Callable[[bytes], object], data: bytes, seconds: float) -> float:
    """Best seconds per call over ~5 rounds of `seconds` / 5 each."""
    fn(data)
    times = []
    for _ in range(5):
        calls, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds / 5:
            fn(data)
            calls += 1
        times.append(elapsed / calls)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-bytes", type=int, default=16 * 1024)
    parser.add_argument("--seconds", type=float, default=1.5)
    args = parser.parse_args()
    from kafka_sidecar_transcoder import pure

    paths: dict[str, Callable[[bytes], object]] = {"current (aiokafka + protobuf)": current}
    try:
        from kafka_sidecar_transcoder import native
    except ImportError:
        print("compiled implementation not built: pip install ./transcoder")
    else:
        paths["compiled: transcode + batch_bytes"] = via(native, whole=True)
        paths["compiled: transcode only"] = via(native, whole=False)
    paths["pure: transcode + batch_bytes"] = via(pure, whole=True)
    paths["pure: transcode only"] = via(pure, whole=False)

    print(f"{'codec':6} {'path':36} {'records/s':>12} {'µs/record':>10} {'MiB/s in':>9}")
    for codec in CODECS:
        data, count = fetch(codec, args.batch_bytes)
        reference = current(data)
        for name, fn in paths.items():
            out = fn(data)
            if isinstance(out, bytes):
                assert out == reference, f"{name} differs from the current path"
            per_call = best(fn, data, args.seconds)
            print(
                f"{codec:6} {name:36} {count / per_call:12,.0f} {per_call / count * 1e6:10.3f}"
                f" {len(data) / per_call / (1 << 20):9.1f}"
            )
        print(f"{'':6} ({count} records, {len(data):,} bytes in the fetch)")


if __name__ == "__main__":
    main()
