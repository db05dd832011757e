"""The pure-Python implementation: the fallback where the extension is not built, the reader of
legacy message sets (magic 0 and 1) for the compiled one, and the tests' second opinion.

Batches are read with aiokafka's own record classes (its Cython ones when built), and
`_unpack` repeats aiokafka/consumer/fetcher.py `PartitionRecords._unpack_records` step by
step, so the semantics are aiokafka's by construction; only the framing of batches is done
here (aiokafka's Cython `MemoryRecords` takes every batch's magic from the first batch's: a
fetch mixing formats is misread there). The records then go to protobuf bytes directly,
without protobuf objects.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Iterable, Sequence

from aiokafka.errors import CorruptRecordException, KafkaError
from aiokafka.record.control_record import ABORT_MARKER, ControlRecord
from aiokafka.record.default_records import DefaultRecordBatch
from aiokafka.record.legacy_records import LegacyRecordBatch
from aiokafka.structs import TopicPartition

from ._types import CorruptRecordError, Run, Transcoded, TranscodeError

_LOG_OVERHEAD = 12  # BaseOffset Int64, Length Int32
_MIN_LENGTH = 14  # memory_records: the smallest (v0) message after the log overhead
_V2_HEADER = 61
_LENGTH = struct.Struct(">i")
_U64 = (1 << 64) - 1

# Field tags of kafkasidecar.v1.Record, Header, Batch and ConsumeResponse.
_OFFSET = b"\x18"
_KEY = b"\x22"
_VALUE = b"\x2a"
_HEADERS = b"\x32"
_TIMESTAMP_MS = b"\x38"
_TIMESTAMP_TYPE = b"\x40"
_DELIVERY_ATTEMPT = b"\x48"
_HEADER_KEY = b"\x0a"
_HEADER_VALUE = b"\x12"
_BATCH_ID = b"\x08"
_BATCH_RECORDS = b"\x12"
_RESPONSE_BATCH = b"\x12"

_SMALL = [bytes((i,)) for i in range(128)]


def _varint(value: int) -> bytes:
    """Base-128 varint of a non-negative int below 2**64."""
    if value < 128:
        return _SMALL[value]
    out = bytearray()
    while value >= 128:
        out.append(value & 127 | 128)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field_len(length: int) -> int:
    """Size of a length-delimited field holding `length` bytes."""
    return 1 + ((length.bit_length() + 6) // 7 or 1) + length


def _record_prefix(topic: str, partition: int) -> bytes:
    if not -(2**31) <= partition < 2**31:
        raise OverflowError(f"partition {partition} is out of int32 range")
    encoded = topic.encode()
    prefix = b"\x0a" + _varint(len(encoded)) + encoded if encoded else b""
    if partition:
        prefix += b"\x10" + _varint(partition & _U64)
    return prefix


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
    """See the package's `transcode`."""
    prefix = _record_prefix(topic, partition)
    out = _Out(fetch_offset, keys)
    try:
        _unpack(data, TopicPartition(topic, partition), prefix, out, aborted, check_crcs)
    except TranscodeError:
        raise
    except Exception as exc:
        # aiokafka's errors, and the others its reader lets out (UnicodeDecodeError for a
        # header key that is not UTF-8, struct.error, the codecs' own errors, ...).
        if isinstance(exc, KafkaError) and exc.args:
            message = str(exc.args[0])
        else:
            message = str(exc) or type(exc).__name__
        raise CorruptRecordError(message, out.result()) from exc
    return out.result()


class _Out:
    __slots__ = ("batches", "ends", "keys", "next_offset", "offsets", "sizes", "wire")

    def __init__(self, fetch_offset: int, keys: bool) -> None:
        self.wire = bytearray()
        self.ends: list[int] = []
        self.offsets: list[int] = []
        self.sizes: list[int] = []
        self.next_offset = fetch_offset
        self.batches = 0
        self.keys: list[bytes | None] | None = [] if keys else None

    def result(self) -> Transcoded:
        return Transcoded(
            bytes(self.wire),
            self.ends,
            self.offsets,
            self.sizes,
            self.next_offset,
            self.batches,
            self.keys,
        )


def _unpack(
    data: bytes,
    tp: TopicPartition,
    prefix: bytes,
    out: _Out,
    aborted: Sequence[tuple[int, int]] | None,
    check_crcs: bool,
) -> None:
    read_committed = aborted is not None
    # fetcher.py:182-185
    aborted_transactions = deque(sorted(aborted or (), key=lambda x: x[1]))
    aborted_producers: set[int] = set()
    wire, ends, offsets, sizes = out.wire, out.ends, out.offsets, out.sizes
    view = memoryview(data)
    pos, size = 0, len(data)
    # memory_records: batch framing; a batch cut short at the end is left for the next fetch.
    while size - pos >= _LOG_OVERHEAD:
        length = _LENGTH.unpack_from(data, pos + 8)[0]
        if length < _MIN_LENGTH:
            raise CorruptRecordException(
                f"Record size is less than the minimum record overhead ({_MIN_LENGTH})"
            )
        end = pos + _LOG_OVERHEAD + length
        if end > size:
            break
        magic = data[pos + 16]
        if magic == 2:
            if end - pos < _V2_HEADER:
                raise CorruptRecordException(
                    f"Record batch of {end - pos} bytes is shorter than its"
                    f" {_V2_HEADER}-byte header"
                )
            batch = DefaultRecordBatch(view[pos:end])
        elif magic < 2:
            batch = LegacyRecordBatch(view[pos:end], magic)
        else:
            raise CorruptRecordException(f"Unknown record batch magic {magic}")
        pos = end

        # fetcher.py:216-219
        if check_crcs and not batch.validate_crc():
            raise CorruptRecordException(f"Invalid CRC - {tp}")
        # fetcher.py:221-249
        if read_committed and batch.producer_id is not None:
            base_offset = batch.base_offset
            while aborted_transactions and aborted_transactions[0][1] <= base_offset:
                aborted_producers.add(aborted_transactions.popleft()[0])
            if batch.is_control_batch and _contains_abort_marker(batch):
                aborted_producers.discard(batch.producer_id)
            if batch.is_transactional and batch.producer_id in aborted_producers:
                out.next_offset = batch.next_offset
                out.batches += 1
                continue
        # fetcher.py:251-254
        if batch.is_control_batch:
            out.next_offset = batch.next_offset
            out.batches += 1
            continue

        # fetcher.py:256-264, with the record encoded in place of a ConsumerRecord.
        for record in batch:
            offset = record.offset
            if offset < out.next_offset:
                continue
            key, value = record.key, record.value
            wire += prefix
            if offset:
                wire += _OFFSET
                wire += _varint(offset & _U64)
            length = 0
            if key is not None:
                wire += _KEY
                wire += _varint(len(key))
                wire += key
                length = len(key)
            if value is not None:
                wire += _VALUE
                wire += _varint(len(value))
                wire += value
                length += len(value)
            for hkey, hvalue in record.headers:
                encoded = hkey.encode()
                header_len = _field_len(len(encoded)) if encoded else 0
                if hvalue is not None:
                    header_len += _field_len(len(hvalue))
                wire += _HEADERS
                wire += _varint(header_len)
                if encoded:
                    wire += _HEADER_KEY
                    wire += _varint(len(encoded))
                    wire += encoded
                if hvalue is not None:
                    wire += _HEADER_VALUE
                    wire += _varint(len(hvalue))
                    wire += hvalue
                    length += len(hvalue)
                length += len(hkey)
            timestamp = record.timestamp
            if timestamp:
                wire += _TIMESTAMP_MS
                wire += _varint(timestamp & _U64)
            # None for magic 0: no timestamp, TIMESTAMP_TYPE_UNSPECIFIED.
            if record.timestamp_type is not None:
                wire += _TIMESTAMP_TYPE
                wire += _varint(record.timestamp_type + 1)
            ends.append(len(wire))
            offsets.append(offset)
            sizes.append(length)
            if out.keys is not None:
                out.keys.append(None if key is None else bytes(key))
            out.next_offset = offset + 1
        # fetcher.py:266-273
        out.next_offset = batch.next_offset
        out.batches += 1


def _contains_abort_marker(batch: object) -> bool:
    """fetcher.py:287-296, to the letter: `next()` without `iter()`, so the control record is
    read from the batch as it is, never decompressed."""
    try:
        control_record = next(batch)  # type: ignore[call-overload]
    except StopIteration:
        raise KafkaError("Control batch did not contain any records") from None
    return bool(ControlRecord.parse(control_record.key) == ABORT_MARKER)


def batch_bytes(batch_id: int, runs: Iterable[Run], *, response: bool = False) -> bytes:
    """See the package's `batch_bytes`."""
    if not 0 <= batch_id <= _U64:
        raise OverflowError(f"batch_id {batch_id} is out of uint64 range")
    parts: list[bytes] = [_BATCH_ID, _varint(batch_id)] if batch_id else []
    for wire, ends, lo, hi, attempt in runs:
        if not 0 <= attempt < 2**32:
            raise OverflowError(f"delivery_attempt {attempt} is out of uint32 range")
        tail = _DELIVERY_ATTEMPT + _varint(attempt) if attempt else b""
        start = ends[lo - 1] if lo else 0
        for end in ends[lo:hi]:
            if not start <= end <= len(wire):
                raise ValueError(f"a record ends at {end}, outside its wire of {len(wire)} bytes")
            record = wire[start:end]
            parts += (_BATCH_RECORDS, _varint(len(record) + len(tail)), record, tail)
            start = end
    body = b"".join(parts)
    if response:
        return _RESPONSE_BATCH + _varint(len(body)) + body
    return body
