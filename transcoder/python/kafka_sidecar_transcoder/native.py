"""The compiled implementation (src/, through `kafka_sidecar_transcoder_native`), with the
package's API.

The extension is a top-level module of another distribution (kafka-sidecar-transcoder, built
from transcoder/ by maturin), so that this package, shipped by kafka-sidecar, and it never share
a file. Importing this module fails with ImportError where that is not installed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import kafka_sidecar_transcoder_native as _native

from ._types import CorruptRecordError, Run, Transcoded, UnsupportedFormatError


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
    """See the package's `transcode`. Raises UnsupportedFormatError on a legacy message set."""
    if aborted:
        aborted = [(int(producer_id), int(first)) for producer_id, first in aborted]
    wire, ends, offsets, sizes, next_offset, batches, error, keyed = _native.transcode(
        data, topic, partition, fetch_offset, aborted, check_crcs, keys
    )
    result = Transcoded(wire, ends, offsets, sizes, next_offset, batches, keyed)
    if error is None:
        return result
    kind, message = error
    raise (UnsupportedFormatError if kind == "legacy" else CorruptRecordError)(message, result)


def batch_bytes(batch_id: int, runs: Iterable[Run], *, response: bool = False) -> bytes:
    """See the package's `batch_bytes`."""
    return _native.batch_bytes(batch_id, runs, response=response)
