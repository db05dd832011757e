"""The transcoder (transcoder/): fetch data straight to Record protobuf bytes.

The reference is the current path: aiokafka's consumer reads the fetch (`PartitionRecords` over
`MemoryRecords`, as its fetcher does) and sidecar/wire.py builds the `Batch`. Batches are made
with aiokafka's own builder. Both implementations of the transcoder, the compiled one (when
`pip install ./transcoder` built it) and the pure one, must give the very same `Batch` bytes,
next offset and flow-control sizes.
"""

from __future__ import annotations

import importlib
import random
import struct
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from aiokafka.codec import (
    gzip_encode,
    has_lz4,
    has_snappy,
    has_zstd,
    lz4_encode,
    snappy_encode,
    zstd_encode,
)
from aiokafka.consumer.fetcher import READ_COMMITTED, READ_UNCOMMITTED, PartitionRecords
from aiokafka.errors import CorruptRecordException
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.record.legacy_records import LegacyRecordBatchBuilder
from aiokafka.record.memory_records import MemoryRecords, _MemoryRecordsPy
from aiokafka.record.util import calc_crc32c
from aiokafka.structs import TopicPartition
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kafkasidecar.v1 import consumer_pb2 as pb


def _load() -> tuple[ModuleType, ModuleType, ModuleType | None]:
    """The package (installed, or from the source tree: pure only), its pure implementation,
    and its compiled one when built. Imported by name: it is not a dependency of the project."""
    name = "kafka_sidecar_transcoder"
    try:
        package = importlib.import_module(name)
    except ImportError:
        sys.path.insert(0, str(Path(__file__).parents[1] / "transcoder" / "python"))
        package = importlib.import_module(name)
    try:
        native: ModuleType | None = importlib.import_module(f"{name}.native")
    except ImportError:
        native = None
    return package, importlib.import_module(f"{name}.pure"), native


transcoder, pure, native = _load()
IMPLEMENTATIONS = [pure] if native is None else [pure, native]
IDS = [m.__name__.rsplit(".", 1)[-1] for m in IMPLEMENTATIONS]
needs_native = pytest.mark.skipif(native is None, reason="not built: pip install ./transcoder")

TOPIC, PARTITION = "orders", 7
NONE, GZIP, SNAPPY, LZ4, ZSTD = range(5)
ENCODERS: dict[int, Callable[[bytes], bytes]] = {GZIP: gzip_encode}
if has_snappy():
    ENCODERS[SNAPPY] = snappy_encode
if has_lz4():
    ENCODERS[LZ4] = lz4_encode
if has_zstd():
    ENCODERS[ZSTD] = zstd_encode
CODECS = [NONE, *ENCODERS]
# aiokafka needs cramjam for snappy, lz4 and zstd: without it those are not tested.
ALL_CODECS = pytest.mark.skipif(len(CODECS) < 5, reason="cramjam not installed")

Headers = list[tuple[str, bytes | None]]


@dataclass(frozen=True)
class Rec:
    offset_delta: int
    timestamp: int
    key: bytes | None
    value: bytes | None
    headers: Headers


def make_batch(
    records: Sequence[Rec],
    *,
    base_offset: int = 0,
    codec: int = NONE,
    log_append_time: int | None = None,
    producer_id: int = -1,
    transactional: bool = False,
    control: bool = False,
) -> bytes:
    """A v2 batch as a broker stores it: built by aiokafka's builder, then given what the
    broker sets (base offset, log-append time, the control flag) and its CRC again. The
    records section is compressed here, the way the builder's `_maybe_compress` does, so the
    codec is used even where compressing does not pay."""
    builder = DefaultRecordBatchBuilder(2, NONE, int(transactional), producer_id, 0, 0, 1 << 30)
    for rec in records:
        builder.append(rec.offset_delta, rec.timestamp, rec.key, rec.value, rec.headers)
    buf = bytearray(builder.build())
    attributes = struct.unpack_from(">h", buf, 21)[0]
    if codec != NONE:
        buf[61:] = ENCODERS[codec](bytes(buf[61:]))
        attributes |= codec
    struct.pack_into(">q", buf, 0, base_offset)
    struct.pack_into(">i", buf, 8, len(buf) - 12)
    if log_append_time is not None:
        attributes |= 0x08
        struct.pack_into(">q", buf, 35, log_append_time)
    if control:
        attributes |= 0x20
    struct.pack_into(">h", buf, 21, attributes)
    struct.pack_into(">I", buf, 17, calc_crc32c(bytes(buf[21:])))
    return bytes(buf)


def control_batch(base_offset: int, producer_id: int, *, abort: bool) -> bytes:
    """A transaction marker: key (version 0, type 0 abort / 1 commit), value (version,
    coordinator epoch)."""
    marker = Rec(0, 1_700_000_000_000, struct.pack(">hh", 0, 0 if abort else 1), b"\0" * 6, [])
    return make_batch(
        [marker], base_offset=base_offset, producer_id=producer_id, transactional=True, control=True
    )


@dataclass
class Reference:
    """What the current path makes of a fetch."""

    batch: bytes
    next_offset: int
    offsets: list[int]
    sizes: list[int]
    error: Exception | None
    keys: list[bytes | None]


def reference(
    data: bytes,
    *,
    fetch_offset: int,
    aborted: Sequence[tuple[int, int]] | None,
    batch_id: int,
    attempts: Callable[[int], int],
    check_crcs: bool = True,
    memory_records: Callable[[bytes], Any] = MemoryRecords,
) -> Reference:
    tp = TopicPartition(TOPIC, PARTITION)
    isolation = READ_UNCOMMITTED if aborted is None else READ_COMMITTED
    records = PartitionRecords(
        tp,
        memory_records(data),
        None if aborted is None else list(aborted),
        fetch_offset,
        None,
        None,
        check_crcs,
        isolation,
    )
    consumed = []
    error = None
    try:
        consumed.extend(records)
    except Exception as exc:
        error = exc
    return Reference(
        protobuf_batch(batch_id, consumed, attempts).SerializeToString(deterministic=True),
        records.next_fetch_offset,
        [m.offset for m in consumed],
        [flow_control_size(message) for message in consumed],
        error,
        [m.key for m in consumed],
    )


def protobuf_batch(
    batch_id: int, messages: Sequence[Any], attempts: Callable[[int], int]
) -> pb.Batch:
    """The `Batch` the protobuf runtime builds from aiokafka's ConsumerRecords (the sidecar's
    path before the transcoder): absent key/value/header value mean null."""
    batch = pb.Batch(batch_id=batch_id)
    for i, message in enumerate(messages):
        record = batch.records.add(
            topic=message.topic,
            partition=message.partition,
            offset=message.offset,
            timestamp_ms=message.timestamp,
            timestamp_type=message.timestamp_type + 1,
            delivery_attempt=attempts(i),
        )
        if message.key is not None:
            record.key = message.key
        if message.value is not None:
            record.value = message.value
        for hkey, hvalue in message.headers:
            header = record.headers.add(key=hkey)
            if hvalue is not None:
                header.value = hvalue
    return batch


def flow_control_size(message: Any) -> int:
    """What the flow-control windows count of a record: key, value and headers."""
    key, value = message.key, message.value
    size = (len(key) if key else 0) + (len(value) if value else 0)
    for hkey, hvalue in message.headers:
        size += len(hkey) + (len(hvalue) if hvalue else 0)
    return size


def transcode(
    impl: ModuleType,
    data: bytes,
    *,
    fetch_offset: int,
    aborted: Sequence[tuple[int, int]] | None,
    check_crcs: bool = True,
) -> Any:
    """With the keys (`ordering: key`): `test_keys_only_when_asked` covers the default."""
    return impl.transcode(
        data,
        TOPIC,
        PARTITION,
        fetch_offset=fetch_offset,
        aborted=aborted,
        check_crcs=check_crcs,
        keys=True,
    )


def assert_same(
    impl: ModuleType, result: Any, ref: Reference, batch_id: int, attempts: Callable[[int], int]
) -> None:
    records = [(result.wire, result.ends, i, i + 1, attempts(i)) for i in range(len(result))]
    assert impl.batch_bytes(batch_id, records) == ref.batch
    assert result.offsets == ref.offsets
    assert result.sizes == ref.sizes
    assert result.keys == ref.keys
    assert result.next_offset == ref.next_offset
    assert len(result) == len(ref.offsets)
    assert result.ends[-1:] == ([len(result.wire)] if result.ends else [])
    assert result.wire or not result.ends


def one(_: int) -> int:
    return 1


# ---- The property: random fetches, every codec, transactions, compaction gaps, truncation.

header_keys = st.sampled_from(["", "a", "trace", "é", "ключ"]) | st.text(max_size=12)
small = st.binary(max_size=40)
repeated = st.builds(
    lambda seed, n: (seed * (n // len(seed) + 1))[:n],
    st.binary(min_size=1, max_size=16),
    st.integers(0, 100_000),
)
noise = st.builds(
    lambda seed, n: random.Random(seed).randbytes(n), st.integers(), st.integers(0, 30_000)
)
payloads = st.one_of(st.none(), small, small, small, repeated, noise)
timestamps = st.one_of(
    st.just(-1), st.just(0), st.integers(0, 1 << 42), st.integers(-(1 << 40), 1 << 50)
)


@st.composite
def record_lists(draw: st.DrawFn) -> list[Rec]:
    count = draw(st.integers(1, 6))
    offset_delta, out = 0, []
    for _ in range(count):
        headers = draw(
            st.lists(st.tuples(header_keys, st.none() | st.binary(max_size=24)), max_size=4)
        )
        out.append(Rec(offset_delta, draw(timestamps), draw(payloads), draw(payloads), headers))
        offset_delta += draw(st.sampled_from([1, 1, 1, 2, 5]))  # gaps: compaction
    return out


@dataclass
class Fetch:
    data: bytes
    fetch_offset: int
    aborted: list[tuple[int, int]] | None
    batch_id: int
    attempts: list[int]

    def attempt(self, i: int) -> int:
        return self.attempts[i % len(self.attempts)]


@st.composite
def fetches(draw: st.DrawFn) -> Fetch:
    offset = first = draw(st.integers(0, 1 << 40))
    parts, aborted = [], []
    producers = [1000, 1001, 1002]
    for _ in range(draw(st.integers(1, 5))):
        kind = draw(st.sampled_from(["plain", "plain", "transactional", "control"]))
        producer = draw(st.sampled_from(producers))
        if kind == "control":
            parts.append(control_batch(offset, producer, abort=draw(st.booleans())))
            offset += 1
            continue
        recs = draw(record_lists())
        if kind == "transactional" and draw(st.booleans()):
            aborted.append((producer, offset - draw(st.integers(0, 2))))
        parts.append(
            make_batch(
                recs,
                base_offset=offset,
                codec=draw(st.sampled_from(CODECS)),
                log_append_time=draw(st.none() | timestamps),
                producer_id=producer if kind == "transactional" else -1,
                transactional=kind == "transactional",
            )
        )
        offset += recs[-1].offset_delta + 1 + draw(st.sampled_from([0, 0, 3]))
    data = b"".join(parts)
    if draw(st.booleans()):
        # A batch cut short at the end, as a broker sends at the fetch size limit.
        cut = make_batch(
            draw(record_lists()), base_offset=offset, codec=draw(st.sampled_from(CODECS))
        )
        data += cut[: draw(st.integers(0, len(cut) - 1))]
    return Fetch(
        data,
        fetch_offset=draw(st.integers(first - 2, offset + 1)),
        aborted=draw(st.none() | st.permutations(aborted)),
        batch_id=draw(st.integers(0, (1 << 64) - 1)),
        attempts=draw(st.lists(st.integers(0, (1 << 32) - 1), min_size=1, max_size=4)),
    )


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(fetches())
def test_same_bytes_as_the_current_path(fetch: Fetch) -> None:
    ref = reference(
        fetch.data,
        fetch_offset=fetch.fetch_offset,
        aborted=fetch.aborted,
        batch_id=fetch.batch_id,
        attempts=fetch.attempt,
    )
    assert ref.error is None
    # The batch must parse, and to the same message (not only the same bytes).
    assert pb.Batch.FromString(ref.batch).SerializeToString(deterministic=True) == ref.batch
    for impl in [*IMPLEMENTATIONS, transcoder]:
        result = transcode(impl, fetch.data, fetch_offset=fetch.fetch_offset, aborted=fetch.aborted)
        assert_same(impl, result, ref, fetch.batch_id, fetch.attempt)


# ---- Each codec on its own, with data that compresses, and the framings aiokafka accepts.


@ALL_CODECS
@pytest.mark.parametrize("codec", [GZIP, SNAPPY, LZ4, ZSTD])
@pytest.mark.parametrize("impl", IMPLEMENTATIONS, ids=IDS)
def test_each_codec(impl: ModuleType, codec: int) -> None:
    recs = [
        Rec(i, 1_700_000_000_000 + i, b"key-%d" % i, b"value %d " % i * 300, [("h", b"%d" % i)])
        for i in range(50)
    ]
    compressed = make_batch(recs, base_offset=1000, codec=codec)
    assert struct.unpack_from(">h", compressed, 21)[0] & 7 == codec
    assert len(compressed) < 20_000
    data = compressed + make_batch(recs, base_offset=1050)
    ref = reference(data, fetch_offset=1000, aborted=None, batch_id=1, attempts=lambda i: 1)
    result = transcode(impl, data, fetch_offset=1000, aborted=None)
    assert_same(impl, result, ref, 1, lambda i: 1)
    assert len(result) == 100


def _recompress(batch: bytes, section: bytes) -> bytes:
    buf = bytearray(batch[:61]) + section
    struct.pack_into(">i", buf, 8, len(buf) - 12)
    struct.pack_into(">I", buf, 17, calc_crc32c(bytes(buf[21:])))
    return bytes(buf)


@ALL_CODECS
@pytest.mark.parametrize("impl", IMPLEMENTATIONS, ids=IDS)
def test_other_framings_of_the_codecs(impl: ModuleType) -> None:
    """Raw snappy (not xerial), LZ4 with linked blocks and a content checksum, and several
    zstd and gzip frames back to back: aiokafka reads them all."""
    cramjam = importlib.import_module("cramjam")
    recs = [Rec(i, 5, None, b"abc" * 2000, []) for i in range(20)]
    raw = make_batch(recs)
    section = raw[61:]
    lz4 = cramjam.lz4.Compressor(level=4, content_checksum=True, block_linked=True)
    lz4.compress(section)
    half = len(section) // 2
    variants = {
        SNAPPY: bytes(cramjam.snappy.compress_raw(section)),
        LZ4: bytes(lz4.finish()),
        ZSTD: zstd_encode(section[:half]) + zstd_encode(section[half:]),
        GZIP: gzip_encode(section[:half]) + gzip_encode(section[half:]),
    }
    for codec, compressed in variants.items():
        data = _recompress(raw[:21] + bytes([0, codec]) + raw[23:61], compressed)
        ref = reference(data, fetch_offset=0, aborted=None, batch_id=9, attempts=lambda i: 2)
        assert ref.error is None
        result = transcode(impl, data, fetch_offset=0, aborted=None)
        assert_same(impl, result, ref, 9, lambda i: 2)


# ---- Errors: a bad CRC, corrupt records, legacy message sets.


@pytest.mark.parametrize("impl", IMPLEMENTATIONS, ids=IDS)
def test_a_bad_crc_raises_after_the_records_before_it(impl: ModuleType) -> None:
    good = make_batch([Rec(0, 1, b"k", b"v", []), Rec(1, 2, None, b"w", [])], base_offset=10)
    bad = bytearray(make_batch([Rec(0, 3, b"k", b"value", [])], base_offset=12, codec=GZIP))
    bad[-6] ^= 0x40  # the gzip trailer's CRC-32: the batch's CRC-32C check comes first
    data = good + bytes(bad)
    ref = reference(data, fetch_offset=10, aborted=None, batch_id=1, attempts=lambda i: 1)
    assert isinstance(ref.error, CorruptRecordException)
    with pytest.raises(transcoder.CorruptRecordError, match="Invalid CRC") as raised:
        transcode(impl, data, fetch_offset=10, aborted=None)
    partial = raised.value.partial
    assert_same(impl, partial, ref, 1, lambda i: 1)
    assert (partial.offsets, partial.next_offset, partial.batches) == ([10, 11], 12, 1)
    # Fetching again at the bad batch: nothing before it, the same error.
    with pytest.raises(transcoder.CorruptRecordError) as raised:
        transcode(impl, bytes(bad), fetch_offset=12, aborted=None)
    assert (len(raised.value.partial), raised.value.partial.next_offset) == (0, 12)
    # Unchecked, the broken gzip trailer is the error.
    ref = reference(
        data, fetch_offset=10, aborted=None, batch_id=1, attempts=lambda i: 1, check_crcs=False
    )
    assert ref.error is not None
    with pytest.raises(transcoder.CorruptRecordError):
        transcode(impl, data, fetch_offset=10, aborted=None, check_crcs=False)


@needs_native
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fetches(), st.data())
def test_damaged_fetches_never_crash_and_agree(fetch: Fetch, data: st.DataObject) -> None:
    """Flip bytes, unchecked: the compiled implementation returns or raises TranscodeError,
    never anything else; where both implementations succeed they agree."""
    assert native is not None
    damaged = bytearray(fetch.data)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, max(len(damaged) - 1, 0)))
        if damaged:
            damaged[at] ^= 1 << data.draw(st.integers(0, 7))
    kwargs: dict[str, Any] = {"fetch_offset": fetch.fetch_offset, "aborted": fetch.aborted}
    try:
        got = transcode(native, bytes(damaged), check_crcs=False, **kwargs)
    except transcoder.TranscodeError as exc:
        got = exc
    try:
        expected = transcode(pure, bytes(damaged), check_crcs=False, **kwargs)
    except transcoder.TranscodeError as exc:
        expected = exc
    if not isinstance(got, Exception) and not isinstance(expected, Exception):
        assert got == expected
    # With CRCs checked, both refuse the same fetches.
    outcomes = []
    for impl in IMPLEMENTATIONS:
        try:
            outcomes.append(transcode(impl, bytes(damaged), **kwargs))
        except transcoder.TranscodeError as exc:
            outcomes.append(exc.partial)
    assert outcomes[0] == outcomes[1]


@pytest.mark.parametrize("impl", IMPLEMENTATIONS, ids=IDS)
def test_corrupt_records_raise(impl: ModuleType) -> None:
    recs = [Rec(0, 1, b"k", b"v", [("h", b"x")])]
    # One more record announced than there is.
    buf = bytearray(make_batch(recs))
    struct.pack_into(">i", buf, 57, 2)
    struct.pack_into(">I", buf, 17, calc_crc32c(bytes(buf[21:])))
    assert reference(bytes(buf), fetch_offset=0, aborted=None, batch_id=1, attempts=one).error
    with pytest.raises(transcoder.CorruptRecordError):
        transcode(impl, bytes(buf), fetch_offset=0, aborted=None)
    # A header key that is not UTF-8: aiokafka lets a UnicodeDecodeError out (not a
    # KafkaError); the transcoder's error is an aiokafka CorruptRecordException too.
    buf = bytearray(make_batch([Rec(0, 1, b"k", b"v", [("\u00e9", b"x")])]))
    buf[buf.index("\u00e9".encode())] = 0xFF
    struct.pack_into(">I", buf, 17, calc_crc32c(bytes(buf[21:])))
    error = reference(bytes(buf), fetch_offset=0, aborted=None, batch_id=1, attempts=one).error
    assert isinstance(error, UnicodeDecodeError)
    with pytest.raises(CorruptRecordException):
        transcode(impl, bytes(buf), fetch_offset=0, aborted=None)
    # A length below the minimum.
    with pytest.raises(transcoder.CorruptRecordError, match="minimum record overhead"):
        transcode(impl, bytes(8) + struct.pack(">i", 3) + bytes(30), fetch_offset=0, aborted=None)


def test_legacy_message_sets_go_to_the_pure_implementation() -> None:
    """Magic 1 (and 0) message sets: the compiled implementation hands them over, the package's
    `transcode` reads them as aiokafka does."""
    builder = LegacyRecordBatchBuilder(1, GZIP, 1 << 20)
    for i in range(3):
        builder.append(i, 1_600_000_000_000 + i, b"k%d" % i, b"v%d" % i)
    v1 = bytearray(builder.build())
    struct.pack_into(">q", v1, 0, 52)  # the wrapper's offset: the last inner message's
    struct.pack_into(">I", v1, 12, _crc32(bytes(v1[16:])))
    data = bytes(v1)
    ref = reference(data, fetch_offset=51, aborted=None, batch_id=4, attempts=lambda i: 1)
    assert ref.offsets == [51, 52]
    result = transcode(transcoder, data, fetch_offset=51, aborted=None)
    assert_same(pure, result, ref, 4, lambda i: 1)
    if native is not None:
        with pytest.raises(transcoder.UnsupportedFormatError, match="magic 1"):
            transcode(native, data, fetch_offset=51, aborted=None)
    # Magic 0 has no timestamps: TIMESTAMP_TYPE_UNSPECIFIED (the current path raises TypeError
    # on timestamp_type None + 1).
    builder = LegacyRecordBatchBuilder(0, NONE, 1 << 20)
    builder.append(0, None, None, b"old")
    result = transcode(transcoder, bytes(builder.build()), fetch_offset=0, aborted=None)
    record = pb.Record.FromString(result.wire)
    assert (record.value, record.timestamp_ms, record.timestamp_type) == (b"old", 0, 0)


def _crc32(data: bytes) -> int:
    import zlib

    return zlib.crc32(data)


def test_mixed_formats_in_one_fetch() -> None:
    """A v2 batch then a v1 message: aiokafka's Cython MemoryRecords reads the second with the
    first one's magic (a bug); its Python one, and the transcoder, read both."""
    v2 = make_batch([Rec(0, 5, b"a", b"b", [])], base_offset=0)
    builder = LegacyRecordBatchBuilder(1, NONE, 1 << 20)
    builder.append(0, 6, b"c", b"d")
    v1 = bytearray(builder.build())
    struct.pack_into(">q", v1, 0, 1)
    data = v2 + bytes(v1)
    assert reference(data, fetch_offset=0, aborted=None, batch_id=1, attempts=one).error
    ref = reference(
        data,
        fetch_offset=0,
        aborted=None,
        batch_id=1,
        attempts=lambda i: 1,
        memory_records=_MemoryRecordsPy,
    )
    assert ref.error is None
    assert ref.offsets == [0, 1]
    assert_same(
        pure, transcode(transcoder, data, fetch_offset=0, aborted=None), ref, 1, lambda i: 1
    )


# ---- Positions: nothing delivered, but the position moves.


@pytest.mark.parametrize("impl", IMPLEMENTATIONS, ids=IDS)
def test_next_offset_past_skipped_batches(impl: ModuleType) -> None:
    aborted_txn = make_batch(
        [Rec(0, 1, None, b"x", []), Rec(1, 1, None, b"y", [])],
        base_offset=100,
        producer_id=5,
        transactional=True,
    )
    data = aborted_txn + control_batch(102, 5, abort=True)
    cases: list[tuple[bytes, list[tuple[int, int]] | None, int, list[int], int]] = [
        # (data, aborted, fetch offset, offsets, next offset)
        (data, [(5, 100)], 100, [], 103),
        (data, None, 100, [100, 101], 103),
        (control_batch(7, 5, abort=False), [], 7, [], 8),
        (data, [(5, 100)], 101, [], 103),
        (data[:-1], [(5, 100)], 100, [], 102),  # the marker is cut short: fetched again
        (b"", None, 42, [], 42),
        (data[:40], None, 42, [], 42),  # a first batch larger than the fetch
    ]
    for fetch_data, aborted, fetch_offset, offsets, next_offset in cases:
        ref = reference(
            fetch_data, fetch_offset=fetch_offset, aborted=aborted, batch_id=1, attempts=one
        )
        result = transcode(impl, fetch_data, fetch_offset=fetch_offset, aborted=aborted)
        assert (result.offsets, result.next_offset) == (offsets, next_offset)
        assert (ref.offsets, ref.next_offset) == (offsets, next_offset)
    assert transcode(impl, data[:40], fetch_offset=1, aborted=None).batches == 0


# ---- batch_bytes


@pytest.mark.parametrize("impl", IMPLEMENTATIONS, ids=IDS)
def test_batch_bytes_makes_the_consume_response(impl: ModuleType) -> None:
    recs = [Rec(0, 1, b"k", None, [("a", None), ("a", b"")]), Rec(1, -1, None, b"", [])]
    data = make_batch(recs, base_offset=3)
    result = transcode(impl, data, fetch_offset=0, aborted=None)
    parts = [(result.wire, result.ends, 0, 1, 1), (result.wire, result.ends, 1, 2, 7)]
    response = pb.ConsumeResponse.FromString(impl.batch_bytes(5, parts, response=True))
    ref = reference(data, fetch_offset=0, aborted=None, batch_id=5, attempts=lambda i: [1, 7][i])
    assert response.batch.SerializeToString(deterministic=True) == ref.batch
    assert impl.batch_bytes(5, parts, response=True) == pb.ConsumeResponse(
        batch=pb.Batch.FromString(ref.batch)
    ).SerializeToString(deterministic=True)
    assert impl.batch_bytes(0, []) == b""
    too_big = [(b"", [0], 0, 1, 1 << 32)]
    for bad in [(5, [(b"", [0], 0, 1, -1)]), (5, too_big), (-1, []), (1 << 64, [])]:
        with pytest.raises(OverflowError):
            impl.batch_bytes(*bad)
    with pytest.raises(ValueError, match="outside its wire"):
        impl.batch_bytes(5, [(b"ab", [1, 3], 0, 2, 1)])
    # A run is its records one by one; a whole fetch in one run is the same batch too.
    whole = [(result.wire, result.ends, 0, len(result), 4)]
    singles = [(r, [len(r)], 0, 1, 4) for r in result.split()]
    assert impl.batch_bytes(9, whole) == impl.batch_bytes(9, singles)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS, ids=IDS)
def test_keys_only_when_asked(impl: ModuleType) -> None:
    recs = [Rec(0, 1, b"k", b"v", []), Rec(1, 2, None, b"w", []), Rec(2, 3, b"", None, [])]
    data = make_batch(recs, base_offset=0)
    plain = impl.transcode(data, TOPIC, PARTITION, fetch_offset=0, aborted=None)
    keyed = transcode(impl, data, fetch_offset=0, aborted=None)
    assert plain.keys is None
    assert keyed.keys == [b"k", None, b""]
    assert (plain.wire, plain.ends, plain.offsets, plain.sizes) == (
        keyed.wire,
        keyed.ends,
        keyed.offsets,
        keyed.sizes,
    )
