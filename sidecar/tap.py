"""Fetched records straight to `Record` protobuf bytes, inside aiokafka's own consumer.

Why: aiokafka unpacks every fetched record into a Python `ConsumerRecord` (plus its key,
value and header objects), which the sidecar then copies into protobuf: most of its CPU per
record. With the tap, aiokafka keeps everything it does well (group membership, fetching,
positions, pause/resume, seek) while each partition's fetched bytes go whole to
`kafka_sidecar_transcoder.transcode`, so records never become Python objects.

Where: `Fetcher._proc_fetch_request` in aiokafka/consumer/fetcher.py builds, per partition,
``records = MemoryRecords(part_data[-1])`` and then ``PartitionRecords(tp, records, ...)``,
the iterator `FetchResult.getall` drains. `install` replaces exactly those two module-level
names: `MemoryRecords` by a subclass that also keeps the bytes (`raw`; the Cython class does
not expose its buffer), `PartitionRecords` by a factory that returns a `Transcoding` for
consumers made with ``key_deserializer=TRANSCODE`` and aiokafka's own `PartitionRecords`
for every other consumer in the process. Pinned to aiokafka 0.14: `install` checks the
version and the tapped code and raises `TapError` when either changed.

A `Transcoding` yields one `Transcoded` per fetch (one item toward getmany's max_records),
and `next_fetch_offset` moves as aiokafka's would, control and aborted batches included.
It never raises: on a corrupt batch it yields the records before it, then a `Corrupt` item,
and leaves the position at the bad batch. Raising would make aiokafka's `fetched_records`
drop records already drained from other partitions in the same call, whose positions have
already moved (an aiokafka bug): they would never be delivered. The caller decides instead.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiokafka
from aiokafka.consumer import fetcher
from kafka_sidecar_transcoder import Transcoded, TranscodeError, transcode

__all__ = [
    "TRANSCODE",
    "TRANSCODE_KEYS",
    "Corrupt",
    "TapError",
    "Transcoding",
    "check_pin",
    "install",
]

_TAPPED_CALLS = (
    "MemoryRecords(part_data[-1])",
    "PartitionRecords(tp, records, aborted_transactions, fetch_offset, self._key_deserializer,"
    " self._value_deserializer, self._check_crcs, self._isolation_level)",
)


class TapError(RuntimeError):
    """aiokafka is not the version the tap was written against."""


def TRANSCODE(key: bytes | None) -> Any:  # a constant to pass, not to call
    """Pass as `key_deserializer` to make a consumer yield `Transcoded` items (and `Corrupt`).
    Called only when the tap is not installed, and then it says so."""
    raise RuntimeError("key_deserializer=TRANSCODE needs sidecar.tap.install() before fetching")


def TRANSCODE_KEYS(key: bytes | None) -> Any:  # a constant to pass, not to call
    """`TRANSCODE`, with each record's key too (`Transcoded.keys`, for `ordering: key`)."""
    raise RuntimeError(
        "key_deserializer=TRANSCODE_KEYS needs sidecar.tap.install() before fetching"
    )


@dataclass(frozen=True, slots=True)
class Corrupt:
    """A partition's fetch could not be read from `offset` on (its position stays there)."""

    tp: tuple[str, int]
    offset: int
    error: Exception


class Transcoding:
    """What the tap puts where aiokafka's `PartitionRecords` goes, for one partition's fetch:
    transcodes it on the first `next` (and drops the bytes); no reference cycle."""

    def __init__(
        self,
        tp: tuple[str, int],
        data: bytes,
        *,
        fetch_offset: int,
        aborted: Sequence[tuple[int, int]] | None,
        check_crcs: bool,
        keys: bool = False,
    ) -> None:
        self.next_fetch_offset = fetch_offset
        self._keys = keys
        self._fetch: tuple[tuple[str, int], bytes, Any, bool] | None
        self._fetch = ((tp[0], tp[1]), data, aborted, check_crcs)
        self._items: list[Transcoded | Corrupt] = []

    def __iter__(self) -> Transcoding:
        return self

    def __next__(self) -> Transcoded | Corrupt:
        if self._fetch is not None:
            self._items = self._transcode(*self._fetch)
            self._fetch = None
        if not self._items:
            raise StopIteration
        return self._items.pop(0)

    def _transcode(
        self, tp: tuple[str, int], data: bytes, aborted: Any, check_crcs: bool
    ) -> list[Transcoded | Corrupt]:
        offset = self.next_fetch_offset
        try:
            result = transcode(
                data,
                tp[0],
                tp[1],
                fetch_offset=offset,
                aborted=aborted,
                check_crcs=check_crcs,
                keys=self._keys,
            )
        except TranscodeError as e:
            self.next_fetch_offset = e.partial.next_offset
            before: list[Transcoded | Corrupt] = [e.partial] if len(e.partial) else []
            return [*before, Corrupt(tp, e.partial.next_offset, e)]
        except Exception as e:  # never out of fetched_records
            return [Corrupt(tp, offset, e)]
        self.next_fetch_offset = result.next_offset
        return [result] if len(result) else []


def check_pin(version: str, module: Any) -> None:
    """Raise TapError unless `module` (aiokafka.consumer.fetcher) of aiokafka `version` is
    what the tap was written against."""
    problems = []
    if not version.startswith("0.14."):
        problems.append(f"aiokafka is {version}, not 0.14.x")
    gone = [
        n
        for n in ("MemoryRecords", "PartitionRecords", "Fetcher", "READ_COMMITTED")
        if not hasattr(module, n)
    ]
    problems += [f"fetcher.{name} is gone" for name in gone]
    if not gone:
        try:
            names = list(inspect.signature(module.PartitionRecords).parameters)
            source = textwrap.dedent(inspect.getsource(module.Fetcher._proc_fetch_request))
            calls = {ast.unparse(n) for n in ast.walk(ast.parse(source)) if type(n) is ast.Call}
        except (TypeError, ValueError, OSError, SyntaxError) as e:
            raise TapError(
                f"cannot inspect aiokafka's fetcher ({e}): re-check sidecar/tap.py"
            ) from e
        want = list(inspect.signature(_partition_records).parameters)
        if names != want:
            problems.append(f"PartitionRecords takes {names}, not {want}")
        missing = [c for c in _TAPPED_CALLS if c not in calls]
        problems += [f"Fetcher._proc_fetch_request no longer calls {c}" for c in missing]
    if problems:
        raise TapError(
            "aiokafka changed: " + "; ".join(problems) + ". sidecar/tap.py must be re-checked"
            " against the new aiokafka (its fetcher's MemoryRecords/PartitionRecords)."
        )


_original: dict[str, Any] = {}


def _partition_records(
    tp: Any,
    records: Any,
    aborted_transactions: Sequence[Sequence[int]] | None,
    fetch_offset: int,
    key_deserializer: Any,
    value_deserializer: Any,
    check_crcs: bool,
    isolation_level: int,
) -> Any:
    if key_deserializer is not TRANSCODE and key_deserializer is not TRANSCODE_KEYS:
        return _original["PartitionRecords"](
            tp,
            records,
            aborted_transactions,
            fetch_offset,
            key_deserializer,
            value_deserializer,
            check_crcs,
            isolation_level,
        )
    aborted = None
    if isolation_level == fetcher.READ_COMMITTED:
        aborted = [(p, o) for p, o in aborted_transactions or ()]
    return Transcoding(
        tp,
        records.raw,
        fetch_offset=fetch_offset,
        aborted=aborted,
        check_crcs=check_crcs,
        keys=key_deserializer is TRANSCODE_KEYS,
    )


def install() -> None:
    """Tap aiokafka's fetcher (idempotent). Raises TapError if aiokafka changed."""
    if _original:
        return
    check_pin(aiokafka.__version__, fetcher)

    class MemoryRecords(fetcher.MemoryRecords):  # type: ignore[misc]
        """aiokafka's MemoryRecords, also keeping the bytes it reads."""

        __slots__ = ("raw",)

        def __init__(self, data: bytes) -> None:
            super().__init__(data)
            self.raw = data

    _original.update(MemoryRecords=fetcher.MemoryRecords, PartitionRecords=fetcher.PartitionRecords)
    fetcher.MemoryRecords = MemoryRecords
    fetcher.PartitionRecords = _partition_records
