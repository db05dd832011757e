"""What both implementations return and raise."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from aiokafka.errors import CorruptRecordException

#: Records `lo` to `hi` (exclusive) of a `Transcoded`, as (wire, ends, lo, hi,
#: delivery_attempt): what `batch_bytes` takes, so a run of records costs no object per record.
Run = tuple[bytes, Sequence[int], int, int, int]


@dataclass(frozen=True, slots=True)
class Transcoded:
    """The records one fetch of one partition delivers, as `kafkasidecar.v1.Record` bytes.

    Record i is ``wire[ends[i - 1]:ends[i]]`` (``ends[-1]`` taken as 0 for i = 0): a complete
    `Record` message without `delivery_attempt` and without a length prefix (see
    `batch_bytes`). Plain lists of ints: the sidecar makes one object per record from them
    anyway, and a list hands each int over without boxing it again.
    """

    #: The records' `Record` messages, back to back.
    wire: bytes
    #: End of each record in `wire`.
    ends: list[int]
    #: Offset of each record.
    offsets: list[int]
    #: Flow-control size of each record, as sidecar/inflight.py `_pending` counts it:
    #: len(key) + len(value) + for each header, len(key) (characters) + len(value).
    sizes: list[int]
    #: Where the consumer fetches next: one past the last batch consumed, control and aborted
    #: batches included (aiokafka's `PartitionRecords.next_fetch_offset`).
    next_offset: int
    #: Complete batches consumed, delivered or skipped. 0 with data left means the first
    #: batch is larger than the fetch (aiokafka raises RecordTooLargeError then).
    batches: int
    #: Each record's key (None: a null key), when `transcode` was asked for them
    #: (`keys=True`; the sidecar's `ordering: key`); else None.
    keys: list[bytes | None] | None = None

    def __len__(self) -> int:
        return len(self.ends)

    def split(self) -> list[bytes]:
        """Each record's bytes, in order."""
        wire, start, out = self.wire, 0, []
        for end in self.ends:
            out.append(wire[start:end])
            start = end
        return out


class TranscodeError(ValueError):
    """A fetch that could not be transcoded whole.

    `partial` holds what was delivered before the problem, and where the position would be
    then, as aiokafka yields those records before it raises: deliver them and fetch again at
    `partial.next_offset`, where the problem will show up first.
    """

    def __init__(self, message: str, partial: Transcoded) -> None:
        super().__init__(message)
        self.partial = partial


class CorruptRecordError(TranscodeError, CorruptRecordException):  # type: ignore[misc]
    """Where aiokafka raises CorruptRecordException (or another error while reading): a bad
    CRC, a malformed batch or record, data that does not decompress. Also an aiokafka
    CorruptRecordException (so a KafkaError), for code that handles aiokafka's errors."""


class UnsupportedFormatError(TranscodeError):
    """The compiled implementation met a legacy message set (magic 0 or 1). The package's
    `transcode` then runs the pure implementation, which reads those with aiokafka's reader."""
