"""Bad input from apps, against a real sidecar: every mistake gets a clear status or `rejected`.

Garbage bytes, empty and unknown messages, a second `open`, unknown subscriptions, duplicate
and conflicting refs, unknown enum values, huge reasons, `retry_after_ms` at 2^32-1, and
thousands of random requests on many short streams. After each: the sidecar stays SERVING,
logs no error for it, and a clean stream drains the topic to its end offsets (Kafka's own
view) with nothing lost and nothing stuck.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from kafkasidecar.v1 import consumer_pb2 as pb
from tests.harness import SERVING, Consuming, consuming, read_all
from tests.localkafka import LocalKafka
from tests.sidecarproc import AppStream, ref

CONSUME = "/kafkasidecar.v1.ConsumerService/Consume"
U32_MAX = 2**32 - 1
MIB = 1024 * 1024


def _raw(payload: bytes) -> bytes:
    return payload


class RawStream:
    """A Consume stream at the bytes level: sends whatever bytes it is given, and keeps the
    responses for the test to take (now, or waiting) until the stream ends."""

    def __init__(
        self, channel: grpc.aio.Channel, metadata: Sequence[tuple[str, str]] | None = None
    ) -> None:
        self._requests: asyncio.Queue[bytes | None] = asyncio.Queue()
        consume = channel.stream_stream(
            CONSUME, request_serializer=_raw, response_deserializer=pb.ConsumeResponse.FromString
        )
        self.call: Any = consume(self._iterate(), metadata=metadata)
        self._inbox: asyncio.Queue[pb.ConsumeResponse | None] = asyncio.Queue()
        self.ended = False
        self._reader = asyncio.create_task(self._read())

    async def _iterate(self) -> AsyncIterator[bytes]:
        while (request := await self._requests.get()) is not None:
            yield request

    async def _read(self) -> None:
        try:
            async for response in self.call:
                self._inbox.put_nowait(response)
        except (grpc.aio.AioRpcError, asyncio.CancelledError):
            pass  # the call's code() and details() say why
        finally:
            self._inbox.put_nowait(None)

    def send(self, request: pb.ConsumeRequest | bytes) -> None:
        self._requests.put_nowait(
            request if isinstance(request, bytes) else request.SerializeToString()
        )

    def close(self) -> None:
        """Half-close: no more requests."""
        self._requests.put_nowait(None)

    def cancel(self) -> None:
        self.call.cancel()

    def take(self) -> list[pb.ConsumeResponse]:
        """What has arrived so far, without waiting."""
        taken: list[pb.ConsumeResponse] = []
        while not self._inbox.empty():
            response = self._inbox.get_nowait()
            if response is None:
                self.ended = True
            else:
                taken.append(response)
        return taken

    async def next(self, timeout: float) -> pb.ConsumeResponse | None:
        """The next response; None when the stream ended. TimeoutError if none came."""
        if self.ended:
            return None
        async with asyncio.timeout(timeout):
            response = await self._inbox.get()
        if response is None:
            self.ended = True
        return response

    async def until(self, kind: str, timeout: float = 30) -> pb.ConsumeResponse:
        """The next response of `kind`, skipping others; fails if the stream ends first."""
        async with asyncio.timeout(timeout):
            while True:
                response = await self.next(timeout)
                if response is None:
                    code, details = await self.outcome()
                    raise AssertionError(f"ended {code.name} {details!r} before `{kind}`")
                if response.WhichOneof("kind") == kind:
                    return response

    async def outcome(self, timeout: float = 30) -> tuple[grpc.StatusCode, str]:
        """Waits for the stream to end: its status code and details."""
        async with asyncio.timeout(timeout):
            await asyncio.shield(self._reader)
            code, details = await self.call.code(), str(await self.call.details() or "")
        # Let the request generator finish too: grpc would otherwise try to close it while it
        # waits on its queue ("aclose(): asynchronous generator is already running").
        self.close()
        await asyncio.sleep(0)
        return code, details


def error_lines(log: str) -> list[str]:
    """Log lines at error level or above, and tracebacks (JSON lines or plain text)."""
    bad: list[str] = []
    for line in log.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            if "Traceback" in line or " ERROR " in line or " CRITICAL " in line:
                bad.append(line)
            continue
        if not isinstance(entry, dict):
            continue
        if str(entry.get("level", "")).lower() in ("error", "critical", "fatal") or (
            "Traceback" in str(entry.get("exc", ""))
        ):
            bad.append(line[:2000])
    return bad


def nack(
    batch_ids: Sequence[int] = (),
    records: Sequence[pb.RecordRef] = (),
    action: int = pb.NACK_ACTION_RETRY,
    reason: str = "",
    retry_after_ms: int = 0,
) -> pb.ConsumeRequest:
    return pb.ConsumeRequest(
        nack=pb.Nack(
            batch_ids=batch_ids,
            records=records,
            action=action,  # type: ignore[arg-type]
            reason=reason,
            retry_after_ms=retry_after_ms,
        )
    )


def key(r: pb.Record | pb.RecordRef) -> tuple[str, int, int]:
    return (r.topic, r.partition, r.offset)


async def until_rejected(
    app: AppStream, wanted_batches: set[int], wanted_refs: set[tuple[str, int, int]]
) -> list[pb.Rejected]:
    """Reads responses until every wanted batch id and ref was named in a `rejected`; acks
    any batch that comes meanwhile (the test is done with the window it set up)."""
    got: list[pb.Rejected] = []
    while wanted_batches or wanted_refs:
        response = await app.next(timeout=30)
        if response.WhichOneof("kind") == "batch":
            app.ack(batch_ids=[response.batch.batch_id])
        if response.WhichOneof("kind") != "rejected":
            continue
        rejected = response.rejected
        got.append(rejected)
        wanted_batches -= set(rejected.batch_ids)
        wanted_refs -= {key(r) for r in rejected.records}
    return got


async def serving(c: Consuming) -> None:
    assert c.sidecar.proc is not None
    assert c.sidecar.proc.poll() is None, c.sidecar.logs()[-3000:]
    assert await c.health() == SERVING
    assert await c.health(c.name) == SERVING


# ---- stream errors -------------------------------------------------------------------------


async def test_garbage_bytes_end_the_stream_with_invalid_argument_and_log_no_error(
    kafka: LocalKafka,
) -> None:
    async with consuming(
        kafka,
        "garbage",
        records=20,
        batch={"max_records": 5, "max_wait_ms": 50},
        max_outstanding_batches=1,
    ) as c:
        held = await c.batch()  # a healthy stream holds a batch throughout
        mark = len(c.sidecar.logs())
        opening = pb.ConsumeRequest(open=pb.Open(subscription="garbage")).SerializeToString()
        ack = pb.ConsumeRequest(ack=pb.Ack(batch_ids=[1, 2, 3])).SerializeToString()
        payloads = {
            "0xff * 16": b"\xff" * 16,
            "truncated ack": ack[:-1],
            "length past the end": b"\x12\xff\xff\xff\xff\x0f",
            "bad UTF-8 in open.subscription": b"\x0a\x04\x0a\x02\xc3\x28",
        }
        outcomes: dict[str, tuple[grpc.StatusCode, str]] = {}
        for label, payload in payloads.items():
            for where in ("first", "after open"):
                async with grpc.aio.insecure_channel(c.sidecar.address) as channel:
                    raw = RawStream(channel)
                    if where == "after open":
                        raw.send(opening)
                        await raw.until("opened")
                    raw.send(payload)
                    outcomes[f"{label} ({where})"] = await raw.outcome()
        await asyncio.sleep(1)  # let the sidecar's log lines for the last stream land
        errors = error_lines(c.sidecar.logs()[mark:])

        # The healthy stream goes on; the sidecar still serves.
        c.ack(held)
        next_batch = await c.batch()
        assert next_batch.records
        c.ack(next_batch)
        await serving(c)
        await consume_to_the_end(c, quiet=0)

        problems = [
            f"{what}: {code.name} {details!r}"
            for what, (code, details) in outcomes.items()
            if code != grpc.StatusCode.INVALID_ARGUMENT
        ]
        problems += [f"error-level log line: {line}" for line in errors]
        assert not problems, "\n".join(problems)


async def test_stream_errors_have_the_documented_status(kafka: LocalKafka) -> None:
    async with consuming(
        kafka,
        "strict",
        records=20,
        batch={"max_records": 5, "max_wait_ms": 50},
        max_outstanding_batches=1,
    ) as c:
        held = await c.batch()
        opening = pb.ConsumeRequest(open=pb.Open(subscription="strict"))
        empty = pb.ConsumeRequest()
        unknown_field_only = b"\x78\x01"  # field 15, varint: parses as an empty request
        cases: list[tuple[str, list[pb.ConsumeRequest | bytes], set[grpc.StatusCode]]] = [
            ("empty request first", [empty], {grpc.StatusCode.INVALID_ARGUMENT}),
            ("unknown field only, first", [unknown_field_only], {grpc.StatusCode.INVALID_ARGUMENT}),
            (
                "ack first",
                [pb.ConsumeRequest(ack=pb.Ack(batch_ids=[1]))],
                {grpc.StatusCode.INVALID_ARGUMENT},
            ),
            ("nack first", [nack(batch_ids=[1])], {grpc.StatusCode.INVALID_ARGUMENT}),
            (
                "drain first",
                [pb.ConsumeRequest(drain=pb.Drain())],
                {grpc.StatusCode.INVALID_ARGUMENT},
            ),
            ("second open", [opening, opening], {grpc.StatusCode.INVALID_ARGUMENT}),
            ("empty request after open", [opening, empty], {grpc.StatusCode.INVALID_ARGUMENT}),
            (
                "unknown field only, after open",
                [opening, unknown_field_only],
                {grpc.StatusCode.INVALID_ARGUMENT},
            ),
            (
                "unknown subscription",
                [pb.ConsumeRequest(open=pb.Open(subscription="no-such-subscription"))],
                {grpc.StatusCode.NOT_FOUND},
            ),
            (
                "empty subscription name",
                [pb.ConsumeRequest(open=pb.Open(subscription=""))],
                {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT},
            ),
            ("half-closed before open", [], {grpc.StatusCode.INVALID_ARGUMENT}),
        ]
        problems: list[str] = []
        for label, requests, expected in cases:
            async with grpc.aio.insecure_channel(c.sidecar.address) as channel:
                raw = RawStream(channel)
                for i, request in enumerate(requests):
                    raw.send(request)
                    if i == 0 and request is opening:
                        # `opened` first: what follows is read after a successful open.
                        await raw.until("opened")
                if not requests:
                    raw.close()
                code, details = await raw.outcome()
                print(f"{label}: {code.name} {details!r}")
                if code not in expected:
                    problems.append(f"{label}: {code.name} {details!r}, not {expected}")
                elif not details:
                    problems.append(f"{label}: {code.name} with no details")

        c.ack(held)
        next_batch = await c.batch()
        assert next_batch.records
        c.ack(next_batch)
        await serving(c)
        await consume_to_the_end(c, quiet=0)
        assert not problems, "\n".join(problems)


# ---- duplicate, conflicting and mixed refs -------------------------------------------------


async def test_a_record_nacked_twice_in_one_nack_comes_back_once(kafka: LocalKafka) -> None:
    async with consuming(
        kafka,
        "dup",
        records=10,
        batch={"max_records": 5, "max_wait_ms": 50},
        retry={"initial_backoff_ms": 100, "max_backoff_ms": 500},
    ) as c:
        first = await c.batch()
        twice = first.records[0]
        c.app.send(nack(records=[ref(twice), ref(twice)], reason="nacked twice"))
        # Then the rest of the batch, so the partition can move on.
        c.app.ack(records=[ref(r) for r in first.records[1:]])
        deliveries = await consume_to_the_end(c)
        assert deliveries[twice.offset] == [1, 2], deliveries
        assert all(attempts == [1] for o, attempts in deliveries.items() if o != twice.offset)


async def test_a_record_nacked_with_its_own_batch_comes_back_once(kafka: LocalKafka) -> None:
    """What the Python client's `consumer.nack(record, record.batch)` sends."""
    async with consuming(
        kafka,
        "withbatch",
        records=10,
        batch={"max_records": 5, "max_wait_ms": 50},
        retry={"initial_backoff_ms": 100, "max_backoff_ms": 500},
    ) as c:
        first = await c.batch()
        c.app.send(nack(batch_ids=[first.batch_id], records=[ref(first.records[2])]))
        deliveries = await consume_to_the_end(c)
        for record in first.records:
            assert deliveries[record.offset] == [1, 2], deliveries
        assert all(len(attempts) == 1 for o, attempts in deliveries.items() if o >= 5)


async def test_duplicate_and_batch_plus_record_acks_settle_once(kafka: LocalKafka) -> None:
    async with consuming(
        kafka,
        "dupack",
        records=10,
        batch={"max_records": 5, "max_wait_ms": 50},
        retry={"initial_backoff_ms": 100, "max_backoff_ms": 500},
    ) as c:
        first = await c.batch()
        c.app.ack(records=[ref(first.records[0]), ref(first.records[0])])
        c.app.ack(batch_ids=[first.batch_id], records=[ref(first.records[1])])
        deliveries = await consume_to_the_end(c)
        assert all(attempts == [1] for attempts in deliveries.values()), deliveries
        # Refs named twice may come back as ALREADY_SETTLED, never as anything else.
        for response in c.app.received:
            if response.WhichOneof("kind") == "rejected":
                assert response.rejected.reason == pb.REJECT_REASON_ALREADY_SETTLED, response


async def consume_to_the_end(c: Consuming, quiet: float = 3) -> dict[int, list[int]]:
    """Acks every batch on the opened stream until the group committed the topic's end
    offsets, then for `quiet` seconds more (a record queued twice would show up late);
    returns offset -> delivery attempts seen (one-partition topic). Every delivery on the
    stream so far counts, including those the test read itself."""
    deliveries: dict[int, list[int]] = {}

    async def ack_all() -> None:
        while True:
            batch = await c.batch(timeout=3600)
            c.ack(batch)

    acking = asyncio.create_task(ack_all())
    committing = asyncio.create_task(c.wait_committed(timeout=60))
    try:
        # Whichever comes first: the commits reach the end, or the stream fails (its error).
        await asyncio.wait({acking, committing}, return_when=asyncio.FIRST_COMPLETED)
        if acking.done():
            acking.result()
        await committing
        await asyncio.sleep(quiet)
        if acking.done():
            acking.result()
    finally:
        acking.cancel()
        committing.cancel()
    for response in c.app.received:
        if response.WhichOneof("kind") == "batch":
            for record in response.batch.records:
                deliveries.setdefault(record.offset, []).append(record.delivery_attempt)
    await serving(c)
    return deliveries


async def test_mixed_valid_and_invalid_refs_apply_the_valid_and_reject_the_rest(
    kafka: LocalKafka,
) -> None:
    async with consuming(
        kafka,
        "mixed",
        records=20,
        ordering="none",
        batch={"max_records": 5, "max_wait_ms": 50},
        max_outstanding_batches=2,
    ) as c:
        b1, b2 = await c.batch(), await c.batch()
        topic = c.topic
        made_up_ids = {b2.batch_id + 1000, 2**64 - 1, 0}
        made_up_refs = [
            pb.RecordRef(topic=topic, partition=0, offset=10**12),
            pb.RecordRef(topic=topic, partition=0, offset=-1),
            pb.RecordRef(topic="no-such-topic", partition=0, offset=0),
            pb.RecordRef(topic=topic, partition=7, offset=0),
        ]
        valid_refs = [ref(b2.records[0]), ref(b2.records[3])]
        c.app.ack(
            batch_ids=[b1.batch_id, *sorted(made_up_ids)],
            records=[valid_refs[0], *made_up_refs, valid_refs[1]],
        )
        rejections = await until_rejected(c.app, set(made_up_ids), {key(r) for r in made_up_refs})
        named = {key(r) for x in rejections for r in x.records}
        assert b1.batch_id not in {i for x in rejections for i in x.batch_ids}
        assert not named & {key(r) for r in valid_refs}, "a valid ref was rejected"
        for rejected in rejections:
            assert rejected.message
            allowed = {pb.REJECT_REASON_UNKNOWN, pb.REJECT_REASON_INVALID}
            if [r.offset for r in rejected.records] == [-1] and not rejected.batch_ids:
                allowed.add(pb.REJECT_REASON_ALREADY_SETTLED)  # below the commit point
            assert rejected.reason in allowed, rejected

        # The valid ones were applied: acking them again says ALREADY_SETTLED.
        c.app.ack(batch_ids=[b1.batch_id], records=valid_refs)
        again = await until_rejected(c.app, {b1.batch_id}, {key(r) for r in valid_refs})
        assert {x.reason for x in again} == {pb.REJECT_REASON_ALREADY_SETTLED}
        c.app.ack(
            records=[ref(r) for r in b2.records if key(r) not in {key(v) for v in valid_refs}]
        )
        deliveries = await consume_to_the_end(c)
        assert all(attempts == [1] for attempts in deliveries.values()), deliveries


# ---- unknown enums, huge reasons, huge retry_after_ms --------------------------------------


async def test_unknown_nack_action_is_rejected_as_invalid_and_the_stream_stays_open(
    kafka: LocalKafka,
) -> None:
    async with consuming(
        kafka, "enum", records=10, dead_letter=True, batch={"max_records": 5, "max_wait_ms": 50}
    ) as c:
        batch = await c.batch()
        refs = [ref(r) for r in batch.records[:2]]
        for action in (99, 3, -1, 2**31 - 1):
            c.app.send(nack(batch_ids=[batch.batch_id], records=refs, action=action))
            rejected = await until_rejected(c.app, {batch.batch_id}, {key(r) for r in refs})
            assert {x.reason for x in rejected} == {pb.REJECT_REASON_INVALID}, (action, rejected)
        # The records are still the app's: an ack settles them, nothing comes back.
        c.ack(batch)
        deliveries = await consume_to_the_end(c)
        assert all(attempts == [1] for attempts in deliveries.values()), deliveries
        assert not await read_all(kafka, c.dlq or "", timeout=30)


async def test_a_one_mib_reason_is_applied_or_rejected_never_a_stream_error(
    kafka: LocalKafka,
) -> None:
    async with consuming(
        kafka,
        "reason",
        records=10,
        dead_letter=True,
        ordering="none",
        batch={"max_records": 5, "max_wait_ms": 50},
        retry={"initial_backoff_ms": 100, "max_backoff_ms": 500},
    ) as c:
        batch = await c.batch()
        retried, lettered = batch.records[0], batch.records[1]
        huge = "r" * MIB
        c.app.send(nack(records=[ref(retried)], reason=huge))
        c.app.send(nack(records=[ref(lettered)], action=pb.NACK_ACTION_DEAD_LETTER, reason=huge))
        c.app.ack(records=[ref(r) for r in batch.records[2:]])

        # Each nack is either applied (retried: redelivered; dead-lettered: in the DLQ) or
        # rejected (then the record is still ours to settle). Never a stream error.
        outcome: dict[int, str] = {}
        deadline = time.monotonic() + 60
        while len(outcome) < 2:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"after 60s, of offsets {retried.offset} (retry) and {lettered.offset} "
                    f"(dead letter) only these were applied or rejected: {outcome}; "
                    f"the sidecar's last errors: {error_lines(c.sidecar.logs())[-2:]}"
                )
            try:
                response = await c.app.next(timeout=1)
            except TimeoutError:
                response = pb.ConsumeResponse()
            kind = response.WhichOneof("kind")
            if kind == "rejected":
                for r in response.rejected.records:
                    if r.offset in (retried.offset, lettered.offset):
                        outcome[r.offset] = "rejected"
                        c.app.ack(records=[r])
            elif kind == "batch":
                for record in response.batch.records:
                    if record.offset == retried.offset:
                        assert record.delivery_attempt == 2
                        outcome[record.offset] = "retried"
                c.ack(response.batch)
            if lettered.offset not in outcome and any(
                dict(r.headers)["x-dlq-original-offset"] == str(lettered.offset).encode()
                for r in await read_all(kafka, c.dlq or "", 5)
            ):
                outcome[lettered.offset] = "dead-lettered"
        print(f"1 MiB reasons: {outcome}")
        await consume_to_the_end(c)


async def test_retry_after_max_u32_is_clamped_to_the_max_backoff(kafka: LocalKafka) -> None:
    async with consuming(
        kafka,
        "clamp",
        records=5,
        batch={"max_records": 5, "max_wait_ms": 50},
        retry={"initial_backoff_ms": 100, "max_backoff_ms": 500},
    ) as c:
        batch = await c.batch()
        parked = batch.records[0]
        c.app.send(nack(records=[ref(parked)], retry_after_ms=U32_MAX, reason="49 days?"))
        c.app.ack(records=[ref(r) for r in batch.records[1:]])
        nacked_at = time.monotonic()
        # max_backoff_ms is 500: a generous 30 s, not 49.7 days.
        again = await c.batch(timeout=30)
        took = time.monotonic() - nacked_at
        assert [(r.offset, r.delivery_attempt) for r in again.records] == [(parked.offset, 2)]
        print(f"retry_after_ms=2^32-1 came back after {took:.2f}s")
        c.ack(again)
        await c.wait_committed()
        await serving(c)


# ---- the fuzz: thousands of random requests on many short streams --------------------------

#: Reproduce a run with KS_FUZZ_SEED=<seed printed by the test>.
FUZZ_SEED = int(os.environ.get("KS_FUZZ_SEED", "20250611"))
FUZZ_STREAMS = int(os.environ.get("KS_FUZZ_STREAMS", "36"))
FUZZ_WORKERS = 3
FUZZ_RECORDS = 2000
FUZZ_PARTITIONS = 4
WINDOW_CAPS = {
    "max_outstanding_batches": 4,
    "max_outstanding_records": 100,
    "max_outstanding_bytes": MIB,
}

STEP_KINDS = {
    "recv": 30,
    "ack_batches": 16,
    "ack_records": 10,
    "nack": 14,
    "mixed": 12,
    "made_up": 6,
    "hold": 3,
    "drain": 1,
}
OPENINGS = {"good": 88, "unknown_subscription": 4, "ack_first": 3, "empty_first": 3, "garbage": 2}
ENDINGS = {
    "half_close": 34,
    "cancel": 26,
    "drain_then_close": 14,
    "second_open": 8,
    "empty": 8,
    "garbage": 6,
    "unknown_field": 4,
}
#: The status each opening/ending must produce (CANCELLED: the client cancelled).
EXPECTED_END = {
    "unknown_subscription": {grpc.StatusCode.NOT_FOUND},
    "ack_first": {grpc.StatusCode.INVALID_ARGUMENT},
    "empty_first": {grpc.StatusCode.INVALID_ARGUMENT},
    "garbage_first": {grpc.StatusCode.INVALID_ARGUMENT},
    "half_close": {grpc.StatusCode.OK},
    "cancel": {grpc.StatusCode.CANCELLED},
    "drain_then_close": {grpc.StatusCode.OK},
    "second_open": {grpc.StatusCode.INVALID_ARGUMENT},
    "empty": {grpc.StatusCode.INVALID_ARGUMENT},
    "garbage": {grpc.StatusCode.INVALID_ARGUMENT},
    "unknown_field": {grpc.StatusCode.INVALID_ARGUMENT},
}
GARBAGE = [b"\xff" * 16, b"\x12\xff\xff\xff\xff\x0f", b"\x0a\x04\x0a\x02\xc3\x28", b"\x1a\x80"]


def _weighted(rng: random.Random, weights: dict[str, int]) -> str:
    return rng.choices(list(weights), weights=list(weights.values()))[0]


@dataclass
class Step:
    kind: str
    #: The step's own seed: its choices are fixed by the plan, applied to what was received.
    seed: int


@dataclass
class StreamScript:
    number: int
    opening: str
    window: tuple[int, int, int]
    client_id: str
    steps: list[Step]
    ending: str


def stream_scripts(seed: int, count: int) -> list[StreamScript]:
    """The whole run's plan, from one seed: the same seed, the same scripts."""
    rng = random.Random(seed)
    scripts = []
    for number in range(count):
        window = (
            rng.choice([0, 0, 1, 2, 3, U32_MAX]),
            rng.choice([0, 0, 1, 7, 50, U32_MAX]),
            rng.choice([0, 0, 1, 4096, 2**64 - 1]),
        )
        client_id = rng.choice(["fuzz", "", "ü" * 100, "x" * 10_000, f"w{number}\x00\n"])
        steps = [
            Step(_weighted(rng, STEP_KINDS), rng.getrandbits(64))
            for _ in range(rng.randint(20, 140))
        ]
        scripts.append(
            StreamScript(
                number=number,
                opening=_weighted(rng, OPENINGS),
                window=window,
                client_id=client_id,
                steps=steps,
                ending=_weighted(rng, ENDINGS),
            )
        )
    return scripts


@dataclass
class Figures:
    seed: int
    streams: int = 0
    requests: Counter[str] = field(default_factory=Counter)
    responses: Counter[str] = field(default_factory=Counter)
    rejected: Counter[str] = field(default_factory=Counter)
    endings: Counter[str] = field(default_factory=Counter)
    refs_sent: int = 0
    duplicate_refs: int = 0
    #: (partition, offset) -> how many times any stream received it.
    deliveries: Counter[tuple[int, int]] = field(default_factory=Counter)
    #: The topic acks write outputs to (the transactions run), or "".
    outputs: str = ""
    problems: list[str] = field(default_factory=list)

    def report(self) -> str:
        total = sum(self.deliveries.values())
        return "\n".join(
            [
                f"seed={self.seed} (set KS_FUZZ_SEED to reproduce) streams={self.streams}",
                f"requests sent: {sum(self.requests.values())} {dict(self.requests)}",
                f"ids/refs named: {self.refs_sent}, of them repeats in one request: "
                f"{self.duplicate_refs}",
                f"responses: {dict(self.responses)}",
                f"rejected by reason: {dict(self.rejected)}",
                f"stream endings: {dict(self.endings)}",
                f"records delivered: {len(self.deliveries)} distinct, {total} deliveries, "
                f"{total - len(self.deliveries)} duplicates (redeliveries)",
            ]
        )


class Held:
    """What one fuzz stream received: real batch ids and refs to act on (those it still holds
    as far as it knows, and older ones), and neighbouring and made-up ones to confuse with."""

    def __init__(self, topic: str, dlq: str) -> None:
        self.topic, self.dlq = topic, dlq
        self.batches: dict[int, list[pb.RecordRef]] = {}
        self.batch_of: dict[tuple[str, int, int], int] = {}
        self.seen_ids: list[int] = []
        self.seen_refs: list[pb.RecordRef] = []

    def add(self, batch: pb.Batch) -> None:
        refs = [ref(r) for r in batch.records]
        self.batches[batch.batch_id] = refs
        self.seen_ids.append(batch.batch_id)
        self.seen_refs.extend(refs)
        for r in refs:
            self.batch_of[key(r)] = batch.batch_id

    def forget(self, ids: Sequence[int], refs: Sequence[pb.RecordRef]) -> None:
        for batch_id in ids:
            self.batches.pop(batch_id, None)
        for r in refs:
            batch_id = self.batch_of.get(key(r), -1)
            if batch_id in self.batches:
                self.batches[batch_id] = [x for x in self.batches[batch_id] if key(x) != key(r)]
                if not self.batches[batch_id]:
                    del self.batches[batch_id]

    def pick_batches(self, rng: random.Random, n: int) -> list[int]:
        held = list(self.batches)
        ids = rng.sample(held, k=min(n, len(held)))
        if self.seen_ids and rng.random() < 0.15:
            ids.append(rng.choice(self.seen_ids))  # maybe settled already
        return ids

    def pick_records(self, rng: random.Random, n: int) -> list[pb.RecordRef]:
        held = [r for refs in self.batches.values() for r in refs]
        refs = rng.sample(held, k=min(n, len(held)))
        if self.seen_refs and rng.random() < 0.15:
            refs.append(rng.choice(self.seen_refs))  # maybe settled already
        return refs

    def batches_of(self, refs: Sequence[pb.RecordRef]) -> list[int]:
        return [self.batch_of[key(r)] for r in refs if key(r) in self.batch_of]

    def neighbour_ids(self, rng: random.Random, n: int) -> list[int]:
        """Ids next to real ones, never above the highest seen: batch ids count up per stream, so
        the next one may be on its way to us, and a blind ack of it rightly settles records this
        stream then never reads if it cancels (which the loss check would count as lost)."""
        if not self.seen_ids:
            return self.made_up_ids(rng, n)
        top = max(self.seen_ids)
        return [
            min(top, max(0, rng.choice(self.seen_ids) + rng.choice([-2, -1, 1, 2])))
            for _ in range(n)
        ]

    def neighbour_refs(self, rng: random.Random, n: int) -> list[pb.RecordRef]:
        if not self.seen_refs:
            return self.made_up_refs(rng, n)
        out = []
        for _ in range(n):
            real = rng.choice(self.seen_refs)
            if rng.random() < 0.7:
                offset = real.offset + rng.choice([-3, -2, -1, 1, 2, 3])
                out.append(pb.RecordRef(topic=real.topic, partition=real.partition, offset=offset))
            else:
                partition = (real.partition + rng.choice([1, 2, 3])) % FUZZ_PARTITIONS
                out.append(pb.RecordRef(topic=real.topic, partition=partition, offset=real.offset))
        return out

    def made_up_ids(self, rng: random.Random, n: int) -> list[int]:
        # Out of reach of a short stream, for the reason neighbour_ids gives.
        top = max(self.seen_ids, default=0) + 10_000
        return [
            rng.choice([0, 2**64 - 1, rng.getrandbits(64), top + rng.randint(1, 1000)])
            for _ in range(n)
        ]

    def made_up_refs(self, rng: random.Random, n: int) -> list[pb.RecordRef]:
        out = []
        for _ in range(n):
            topic = rng.choice([self.topic, self.topic, "", "no-such-topic", self.dlq])
            partition = rng.choice([0, 1, 3, FUZZ_PARTITIONS, -1, 2**31 - 1])
            offset = rng.choice([0, -1, 2**63 - 1, rng.randint(0, 5000), -(2**63)])
            out.append(pb.RecordRef(topic=topic, partition=partition, offset=offset))
        return out


class FuzzStream:
    """Runs one stream script against the sidecar, acting on the batches it receives."""

    def __init__(self, c: Consuming, script: StreamScript, figures: Figures) -> None:
        self.c, self.script, self.figures = c, script, figures
        self.held = Held(c.topic, c.dlq or "")
        self.raw: RawStream

    def problem(self, what: str) -> None:
        self.figures.problems.append(f"stream {self.script.number}: {what}")

    def note(self, responses: Sequence[pb.ConsumeResponse]) -> None:
        for response in responses:
            kind = response.WhichOneof("kind")
            self.figures.responses[kind or "empty"] += 1
            if kind == "batch":
                self.held.add(response.batch)
                for r in response.batch.records:
                    self.figures.deliveries[(r.partition, r.offset)] += 1
            elif kind == "rejected":
                reason = response.rejected.reason
                known = reason in pb.RejectReason.values() and reason != 0
                self.figures.rejected[pb.RejectReason.Name(reason) if known else str(reason)] += 1
                if not known:
                    self.problem(f"rejected with reason {reason}")
            elif kind == "opened":
                for name, cap in WINDOW_CAPS.items():
                    if not 0 < getattr(response.opened, name) <= cap:
                        self.problem(
                            f"opened {name}={getattr(response.opened, name)} "
                            f"(asked {self.script.window}, cap {cap})"
                        )

    def send(self, what: str, request: pb.ConsumeRequest | bytes) -> None:
        self.figures.requests[what] += 1
        if isinstance(request, pb.ConsumeRequest) and request.WhichOneof("kind") in ("ack", "nack"):
            body = request.ack if request.HasField("ack") else request.nack
            refs = [key(r) for r in body.records]
            ids = list(body.batch_ids)
            self.figures.refs_sent += len(refs) + len(ids)
            self.figures.duplicate_refs += len(refs) - len(set(refs)) + len(ids) - len(set(ids))
        self.raw.send(request)

    async def run(self) -> None:
        self.figures.streams += 1
        script, c = self.script, self.c
        async with grpc.aio.insecure_channel(c.sidecar.address) as channel:
            self.raw = RawStream(channel)
            if script.opening != "good":
                await self.finish(self.bad_opening(script.opening))
                return
            batches, records, size = script.window
            self.send(
                "open",
                pb.ConsumeRequest(
                    open=pb.Open(
                        subscription=c.name,
                        client_id=script.client_id,
                        max_outstanding_batches=batches,
                        max_outstanding_records=records,
                        max_outstanding_bytes=size,
                    )
                ),
            )
            for step in script.steps:
                self.note(self.raw.take())
                if self.raw.ended:
                    break
                await self.step(step.kind, random.Random(step.seed))
            self.note(self.raw.take())
            await self.finish("ended early" if self.raw.ended else await self.end(script.ending))

    def bad_opening(self, opening: str) -> str:
        if opening == "unknown_subscription":
            self.send("open", pb.ConsumeRequest(open=pb.Open(subscription="no-such-sub")))
        elif opening == "ack_first":
            self.send("ack", pb.ConsumeRequest(ack=pb.Ack(batch_ids=[1])))
        elif opening == "empty_first":
            self.send("empty", pb.ConsumeRequest())
        else:
            self.send("garbage", GARBAGE[self.script.number % len(GARBAGE)])
            return "garbage_first"
        return opening

    async def end(self, ending: str) -> str:
        if ending == "half_close":
            self.raw.close()
        elif ending == "cancel":
            self.raw.cancel()
        elif ending == "drain_then_close":
            self.send("drain", pb.ConsumeRequest(drain=pb.Drain()))
            await asyncio.sleep(0.1)
            self.raw.close()
        elif ending == "second_open":
            self.send("open", pb.ConsumeRequest(open=pb.Open(subscription=self.c.name)))
        elif ending == "empty":
            self.send("empty", pb.ConsumeRequest())
        elif ending == "unknown_field":
            self.send("unknown_field", b"\x78\x01")
        else:
            self.send("garbage", GARBAGE[self.script.number % len(GARBAGE)])
        return ending

    async def finish(self, how: str) -> None:
        try:
            code, details = await self.raw.outcome(timeout=30)
        except TimeoutError:
            code, details = grpc.StatusCode.DEADLINE_EXCEEDED, "still open 30s after its end"
            self.raw.cancel()
        self.note(self.raw.take())
        self.figures.endings[f"{how}: {code.name}"] += 1
        if code not in EXPECTED_END.get(how, set()):
            self.problem(f"{how}: ended {code.name} {details[:300]!r}")

    async def step(self, kind: str, rng: random.Random) -> None:
        held = self.held
        if kind == "recv":
            wait = rng.choice([0.0, 0.02, 0.05, 0.2])
            if wait:
                try:
                    response = await self.raw.next(timeout=wait)
                except TimeoutError:
                    return
                if response is not None:
                    self.note([response])
        elif kind == "hold":
            await asyncio.sleep(rng.choice([0.1, 0.3, 0.6]))
        elif kind == "drain":
            self.send("drain", pb.ConsumeRequest(drain=pb.Drain()))
        elif kind == "ack_batches":
            ids = held.pick_batches(rng, rng.randint(1, 3))
            if self.figures.outputs and ids and rng.random() < 0.5:
                self.send("ack", self.with_outputs(rng, ids[:1], held.batches.get(ids[0], [])))
                held.forget(ids[:1], [])
                return
            if rng.random() < 0.2:
                ids += held.neighbour_ids(rng, 1)
            self.send("ack", pb.ConsumeRequest(ack=pb.Ack(batch_ids=ids)))
            held.forget(ids, [])
        elif kind == "ack_records":
            refs = held.pick_records(rng, rng.randint(1, 8))
            if self.figures.outputs and refs and rng.random() < 0.5:
                self.send("ack", self.with_outputs(rng, [], refs[:1]))
                held.forget([], refs[:1])
                return
            if refs and rng.random() < 0.3:
                refs += rng.sample(refs, k=rng.randint(1, len(refs)))  # named twice
            rng.shuffle(refs)
            self.send("ack", pb.ConsumeRequest(ack=pb.Ack(records=refs)))
            held.forget([], refs)
        else:
            self.settle(kind, rng)

    def with_outputs(
        self, rng: random.Random, ids: list[int], refs: Sequence[pb.RecordRef]
    ) -> pb.ConsumeRequest:
        """An ack of one batch (`ids`, holding `refs`) or of one record (`refs` alone) with an
        output per record whose value names it, so each output visible in the end was written
        by that record's one settlement; now and then with a second output that has no topic
        (the ack is then refused)."""
        outputs = [
            pb.OutputRecord(topic=self.figures.outputs, value=f"{r.partition}:{r.offset}".encode())
            for r in refs
        ]
        if rng.random() < 0.1:
            outputs.append(pb.OutputRecord(value=b"no topic"))
        records = [] if ids else list(refs)
        return pb.ConsumeRequest(ack=pb.Ack(batch_ids=ids, records=records, outputs=outputs))

    def settle(self, kind: str, rng: random.Random) -> None:
        """A nack (or ack) of real, neighbouring, made-up and repeated ids and refs."""
        held = self.held
        if kind == "nack":
            ids = held.pick_batches(rng, rng.randint(0, 2))
            refs = held.pick_records(rng, rng.randint(0 if ids else 1, 5))
            if refs and rng.random() < 0.3:
                refs += rng.sample(refs, k=1)  # named twice
            if refs and rng.random() < 0.3:
                ids += held.batches_of(refs[:1])  # a record together with its own batch
        elif kind == "mixed":
            ids = held.pick_batches(rng, rng.randint(0, 2)) + held.neighbour_ids(rng, 2)
            refs = (
                held.pick_records(rng, rng.randint(0, 4))
                + held.neighbour_refs(rng, rng.randint(0, 4))
                + held.made_up_refs(rng, rng.randint(0, 3))
            )
            refs += rng.sample(refs, k=min(len(refs), rng.randint(0, 2)))
            if rng.random() < 0.3:
                ids += held.batches_of(refs[:2])
        else:
            ids = held.made_up_ids(rng, rng.randint(0, 3))
            refs = held.made_up_refs(rng, rng.randint(0, 4))
        rng.shuffle(refs)
        if kind == "nack" or rng.random() < 0.6:
            request = nack(
                batch_ids=ids,
                records=refs,
                action=rng.choices([0, 1, 2, 3, 99, -1, 2**31 - 1], [8, 40, 14, 3, 4, 2, 2])[0],
                reason=rng.choices(
                    ["", "downstream 503", "ü€\x00\n" * 10, "r" * 8192, "x" * 65536],
                    [25, 40, 10, 20, 5],
                )[0],
                retry_after_ms=rng.choices(
                    [0, rng.randint(1, 300), U32_MAX, rng.randint(10**6, 10**9)], [50, 25, 15, 10]
                )[0],
            )
            self.send("nack", request)
        else:
            self.send("ack", pb.ConsumeRequest(ack=pb.Ack(batch_ids=ids, records=refs)))
        held.forget(ids, refs)


def dead_lettered(records: Sequence[Any], topic: str) -> set[tuple[int, int]]:
    """(partition, offset) of the source records that DLQ records say they came from."""
    out = set()
    for letter in records:
        headers = {k: v for k, v in letter.headers}
        if headers.get("x-dlq-original-topic") == topic.encode():
            out.add(
                (
                    int(headers["x-dlq-original-partition"]),
                    int(headers["x-dlq-original-offset"]),
                )
            )
    return out


@pytest.mark.parametrize("ordering", ["partition", "none", "key", "transactions"])
async def test_thousands_of_random_requests_on_short_streams_lose_nothing_and_stick_nothing(
    kafka: LocalKafka, new_topic: Callable[..., Awaitable[str]], ordering: str
) -> None:
    """`transactions`: ordering partition with transactions on, and half the acks of one
    batch or record carry an output per record: besides the rest, no output becomes visible
    twice."""
    seed = FUZZ_SEED + ["partition", "none", "key", "transactions"].index(ordering)
    figures = Figures(seed)
    scripts = stream_scripts(seed, FUZZ_STREAMS)
    extra: dict[str, Any] = {}
    if ordering == "transactions":
        figures.outputs = await new_topic(partitions=2)
        extra["transactions"] = {"enabled": True, "transactional_id_prefix": "fuzz"}
        ordering = "partition"
    async with consuming(
        kafka,
        f"fuzz-{ordering}",
        partitions=FUZZ_PARTITIONS,
        records=FUZZ_RECORDS,
        size=64,
        dead_letter=True,
        open=False,
        ordering=ordering,
        batch={"max_records": 25, "max_bytes": 65536, "max_wait_ms": 50},
        window=WINDOW_CAPS,
        ack_deadline_ms=1000,
        retry={"max_attempts": 4, "initial_backoff_ms": 20, "multiplier": 2, "max_backoff_ms": 300},
        **extra,
    ) as c:
        started = time.monotonic()
        todo = list(scripts)

        async def worker() -> None:
            while todo:
                await FuzzStream(c, todo.pop(0), figures).run()

        await asyncio.gather(*(worker() for _ in range(FUZZ_WORKERS)))
        chaos_s = time.monotonic() - started

        # After the chaos: still alive and SERVING.
        assert c.sidecar.proc is not None
        if c.sidecar.proc.poll() is not None:
            raise AssertionError(
                f"the sidecar exited\n{figures.report()}\n{c.sidecar.logs()[-5000:]}"
            )
        for service in ("", c.name):
            if (status := await c.health(service)) != SERVING:
                figures.problems.append(f"health {service or 'overall'!r}: {status}")

        # One clean stream that acks everything it gets drives commits to the end offsets.
        clean = await c.open_stream()
        clean_deliveries = 0

        async def ack_everything() -> None:
            nonlocal clean_deliveries
            while True:
                batch = (await clean.next("batch", timeout=3600)).batch
                clean_deliveries += len(batch.records)
                for r in batch.records:
                    figures.deliveries[(r.partition, r.offset)] += 1
                clean.ack(batch_ids=[batch.batch_id])

        acking = asyncio.create_task(ack_everything())
        drain_started = time.monotonic()
        drained = True
        try:
            await c.wait_committed(timeout=120)
        except AssertionError:
            drained = False
        drain_s = time.monotonic() - drain_started
        if acking.done() and acking.exception() is not None:
            figures.problems.append(f"the clean stream failed: {acking.exception()!r}")
        acking.cancel()
        committed = {p: o for (_t, p), o in sorted((await c.committed()).items())}
        ends = {p: o for (_t, p), o in sorted((await c.end_offsets()).items())}
        result = (
            f"drained to the end offsets {ends} in {drain_s:.1f}s"
            if drained
            else f"STUCK: after {drain_s:.0f}s committed {committed}, end offsets {ends}"
        )
        if not drained:
            figures.problems.append(result)

        letters = await read_all(kafka, c.dlq or "")
        dead = dead_lettered(letters, c.topic)
        missing = set(c.produced) - set(figures.deliveries) - dead
        if missing:
            # Once drained, a record never delivered and not in the DLQ is lost; while stuck,
            # it may still be waiting behind the stuck ones.
            what = "lost (never delivered, not in the DLQ)" if drained else "never delivered"
            figures.problems.append(f"{len(missing)} {what}: {sorted(missing)[:20]}")
        if figures.outputs:
            written = Counter(
                r.value
                for r in await read_all(kafka, figures.outputs, isolation_level="read_committed")
            )
            twice = [value for value, n in written.items() if n > 1]
            if twice:
                figures.problems.append(f"{len(twice)} outputs visible twice: {twice[:10]}")
            print(f"outputs visible (read_committed): {len(written)}")
        errors = error_lines(c.sidecar.logs())
        if errors:
            figures.problems.append(
                f"{len(errors)} error-level log lines; first: {errors[0][:600]}"
            )
        print(figures.report())
        print(
            f"ordering={ordering} records={len(c.produced)} partitions={FUZZ_PARTITIONS} "
            f"chaos={chaos_s:.1f}s; clean stream got {clean_deliveries} records; "
            f"dead-lettered: {len(dead)} ({len(letters)} DLQ records); "
            f"never delivered: {len(missing)}; result: {result}"
        )
        unique = list(dict.fromkeys(figures.problems))
        assert not unique, f"{len(unique)} problems:\n" + "\n".join(unique[:40])
