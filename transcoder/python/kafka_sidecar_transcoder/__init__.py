"""Kafka record batches straight to `kafkasidecar.v1.Record` protobuf bytes.

`transcode` turns the records of one partition in a fetch response into the bytes of the
`Record` messages the sidecar sends, with aiokafka's consumer semantics (decompression,
CRC-32C checks, control batches skipped, aborted transactions skipped under read_committed,
records below the fetch position skipped, log-append time), so records never become Python
objects. `batch_bytes` puts records (and their delivery attempts) into a `Batch`.

Two implementations of the same API: `native` (Rust, src/, when the extension is built) and
`pure` (Python over aiokafka's record classes). The functions here use the compiled one when
it is there, and the pure one otherwise or when KAFKA_SIDECAR_TRANSCODER=pure; a fetch holding
legacy message sets (magic 0 or 1), which only the pure one reads, goes to the pure one.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from types import ModuleType

from . import pure
from ._types import CorruptRecordError, Run, Transcoded, TranscodeError, UnsupportedFormatError

__all__ = [
    "IMPLEMENTATION",
    "CorruptRecordError",
    "Run",
    "TranscodeError",
    "Transcoded",
    "UnsupportedFormatError",
    "batch_bytes",
    "transcode",
]

_compiled: ModuleType | None
try:
    from . import native as _compiled
except ImportError:  # the extension is not built
    _compiled = None
if os.environ.get("KAFKA_SIDECAR_TRANSCODER") == "pure":
    _compiled = None

#: Which implementation `transcode` and `batch_bytes` use: "native" or "pure".
IMPLEMENTATION = "pure" if _compiled is None else "native"


def transcode(
    data: bytes,
    topic: str,
    partition: int,
    *,
    fetch_offset: int,
    aborted: Sequence[tuple[int, int]] | None,
    check_crcs: bool = True,
    keys: bool = False,
) -> Transcoded:
    """The records one fetch response holds for one partition, as `Record` bytes.

    data: the partition's records (the fetch response's message set), batches back to back;
        a batch cut short at the end, as brokers send, is left for the next fetch.
    fetch_offset: the position the fetch was made at; records below it are skipped.
    aborted: under read_committed, the fetch response's aborted transactions as
        (producer_id, first_offset) pairs (an empty sequence when it has none); None under
        read_uncommitted.
    check_crcs: check each batch's CRC-32C (a mismatch raises), as aiokafka's check_crcs.
    keys: also hand over each record's key (`Transcoded.keys`), for `ordering: key`.

    Raises CorruptRecordError where aiokafka's consumer raises (its `partial` holds the
    records before the problem).
    """

    def run(impl: ModuleType) -> Transcoded:
        result: Transcoded = impl.transcode(
            data,
            topic,
            partition,
            fetch_offset=fetch_offset,
            aborted=aborted,
            check_crcs=check_crcs,
            keys=keys,
        )
        return result

    try:
        return run(pure if _compiled is None else _compiled)
    except UnsupportedFormatError:
        # Magic 0 or 1: aiokafka's reader, and so the pure implementation, reads those.
        return run(pure)


def batch_bytes(batch_id: int, runs: Iterable[Run], *, response: bool = False) -> bytes:
    """The bytes of a `Batch` with `batch_id` and the records of `runs`: (wire, ends, lo, hi,
    delivery_attempt), records `lo` to `hi` of a `Transcoded`'s `wire` and `ends` (a lone
    record's bytes `b` are the run (b, [len(b)], 0, 1, attempt)). Each record goes in as
    field 2 with its `delivery_attempt` appended after its other fields (valid protobuf, and
    the very bytes the protobuf runtime writes for the same message). With `response`, the
    bytes of the `ConsumeResponse` whose `batch` that is, ready for a stream whose serializer
    passes bytes through."""
    if _compiled is None:
        return pure.batch_bytes(batch_id, runs, response=response)
    result: bytes = _compiled.batch_bytes(batch_id, runs, response=response)
    return result
