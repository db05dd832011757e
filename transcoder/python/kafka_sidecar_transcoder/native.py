"""The compiled implementation (src/, through `_native`), with the package's API.

Importing this module fails with ImportError where the extension is not built.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from . import _native
from ._types import CorruptRecordError, Transcoded, UnsupportedFormatError


def transcode(
    data: bytes,
    topic: str,
    partition: int,
    *,
    fetch_offset: int,
    aborted: Sequence[tuple[int, int]] | None,
    check_crcs: bool = True,
) -> Transcoded:
    """See the package's `transcode`. Raises UnsupportedFormatError on a legacy message set."""
    if aborted:
        aborted = [(int(producer_id), int(first)) for producer_id, first in aborted]
    wire, ends, offsets, sizes, next_offset, batches, error = _native.transcode(
        data, topic, partition, fetch_offset, aborted, check_crcs
    )
    result = Transcoded(wire, ends, offsets, sizes, next_offset, batches)
    if error is None:
        return result
    kind, message = error
    raise (UnsupportedFormatError if kind == "legacy" else CorruptRecordError)(message, result)


def batch_bytes(
    batch_id: int, records: Iterable[tuple[bytes, int]], *, response: bool = False
) -> bytes:
    """See the package's `batch_bytes`."""
    return _native.batch_bytes(batch_id, records, response=response)
