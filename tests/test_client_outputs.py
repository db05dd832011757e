"""The Python client's ack outputs (`kafkasidecar.Output`): the requests an ack builds.

No sidecar here: batches are built on a fake stream that records what would go on the wire,
so these pin the protobuf each call sends (and that calls without outputs send what they
always did), and what is refused before anything is marked settled.
"""

from __future__ import annotations

from typing import Any, cast

import pytest

from kafkasidecar import Batch, Output, SidecarConsumer, StreamLostError
from kafkasidecar._connection import Connection
from kafkasidecar.v1 import consumer_pb2 as pb


class FakeStream:
    """Stands in for a Connection: keeps what is sent instead of writing it to gRPC."""

    def __init__(self, *, transactional: bool = False, alive: bool = True) -> None:
        self.sent: list[pb.ConsumeRequest] = []
        self.stream_id = "s-1"
        self.transactional = transactional
        self.alive = alive

    async def send(self, request: pb.ConsumeRequest, batch: Any = None) -> None:
        if not self.alive:
            raise StreamLostError("gone")
        self.sent.append(request)


def make_batch(
    stream: FakeStream, batch_id: int = 1, refs: tuple[tuple[str, int, int], ...] = ()
) -> Batch:
    refs = refs or (("in", 0, 10), ("in", 0, 11))
    records = [
        pb.Record(topic=t, partition=p, offset=o, key=f"k{o}".encode(), value=f"v{o}".encode())
        for t, p, o in refs
    ]
    return Batch(cast(Connection, stream), pb.Batch(batch_id=batch_id, records=records))


def consumer() -> SidecarConsumer:
    """Acks through a consumer need no stream of its own: each item knows its stream."""
    return SidecarConsumer("unix:///nowhere.sock", "sub")


def the_ack(stream: FakeStream) -> pb.Ack:
    (request,) = stream.sent
    assert request.WhichOneof("kind") == "ack"
    return request.ack


def test_output_defaults_and_wire_form_keep_null_apart_from_empty() -> None:
    bare = Output("out").to_pb()
    assert bare.topic == "out"
    for field in ("key", "value", "partition"):
        assert not bare.HasField(field), field
    assert list(bare.headers) == []

    full = Output(
        "out",
        value=b"",
        key=b"",
        headers=[("a", b"1"), ("n", None), ("a", b"2")],
        partition=0,
    ).to_pb()
    assert full.HasField("key")
    assert full.key == b""
    assert full.HasField("value")
    assert full.value == b""
    assert full.HasField("partition")
    assert full.partition == 0
    assert [(h.key, h.value if h.HasField("value") else None) for h in full.headers] == [
        ("a", b"1"),
        ("n", None),
        ("a", b"2"),
    ]


def test_output_positional_order_and_headers_frozen_as_a_tuple() -> None:
    headers = [("h", b"x")]
    output = Output("out", b"value", b"key", headers, 3)
    headers.append(("late", b"y"))  # the app's list changing later changes nothing
    assert output == Output("out", value=b"value", key=b"key", headers=(("h", b"x"),), partition=3)
    assert output.headers == (("h", b"x"),)
    with pytest.raises(AttributeError):
        output.topic = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"topic": ""}, ValueError),
        ({"topic": "t", "value": "text"}, TypeError),
        ({"topic": "t", "key": 1}, TypeError),
        ({"topic": "t", "headers": [("h", "text")]}, TypeError),
        ({"topic": "t", "headers": [(b"h", b"v")]}, TypeError),
        ({"topic": "t", "partition": -1}, ValueError),
        ({"topic": "t", "partition": 2**31}, ValueError),
        ({"topic": "t", "partition": True}, ValueError),
    ],
)
def test_a_bad_output_is_refused_where_it_is_made(
    kwargs: dict[str, Any], error: type[Exception]
) -> None:
    with pytest.raises(error):
        Output(**kwargs)


async def test_acks_without_outputs_send_what_they_always_did() -> None:
    stream = FakeStream()
    await make_batch(stream, 1).ack()
    batch = make_batch(stream, 2)
    await batch.records[0].ack()
    await batch.records[0].ack(outputs=[])  # settled: sends nothing, raises nothing
    await consumer().ack(make_batch(stream, 3), outputs=())
    assert stream.sent == [
        pb.ConsumeRequest(ack=pb.Ack(batch_ids=[1])),
        pb.ConsumeRequest(ack=pb.Ack(records=[pb.RecordRef(topic="in", partition=0, offset=10)])),
        pb.ConsumeRequest(ack=pb.Ack(batch_ids=[3])),
    ]


async def test_batch_ack_carries_one_output_per_record() -> None:
    stream = FakeStream()
    batch = make_batch(stream, 7)
    await batch.ack(
        outputs=[
            Output("out", value=r.value, key=r.key, headers=[("x-source-offset", b"%d" % r.offset)])
            for r in batch
        ]
    )
    assert batch.settled
    ack = the_ack(stream)
    assert list(ack.batch_ids) == [7]
    assert list(ack.records) == []
    assert [(o.topic, o.key, o.value) for o in ack.outputs] == [
        ("out", b"k10", b"v10"),
        ("out", b"k11", b"v11"),
    ]
    assert [[(h.key, h.value) for h in o.headers] for o in ack.outputs] == [
        [("x-source-offset", b"10")],
        [("x-source-offset", b"11")],
    ]
    assert not any(o.HasField("partition") for o in ack.outputs)


async def test_record_ack_carries_its_outputs_and_accepts_a_generator() -> None:
    stream = FakeStream()
    record = make_batch(stream).records[1]
    await record.ack(outputs=(Output(t, value=b"x", partition=2) for t in ("a", "b")))
    ack = the_ack(stream)
    assert list(ack.records) == [pb.RecordRef(topic="in", partition=0, offset=11)]
    assert [(o.topic, o.partition) for o in ack.outputs] == [("a", 2), ("b", 2)]
    assert record.settled
    assert not record.batch.settled


async def test_consumer_ack_puts_batches_and_records_of_one_stream_in_one_request() -> None:
    stream = FakeStream()
    first, second = make_batch(stream, 1), make_batch(stream, 2, (("in", 1, 5), ("in", 1, 6)))
    await consumer().ack(first, second.records[0], outputs=[Output("out", value=b"sum")])
    ack = the_ack(stream)
    assert list(ack.batch_ids) == [1]
    assert list(ack.records) == [pb.RecordRef(topic="in", partition=1, offset=5)]
    assert [o.value for o in ack.outputs] == [b"sum"]


async def test_outputs_on_an_ack_that_settles_nothing_are_an_error_not_dropped() -> None:
    stream = FakeStream()
    batch = make_batch(stream)
    await batch.ack()
    stream.sent.clear()
    with pytest.raises(ValueError, match="settled already"):
        await batch.ack(outputs=[Output("out")])
    with pytest.raises(ValueError, match="settled already"):
        await batch.records[0].ack(outputs=[Output("out")])
    with pytest.raises(ValueError, match="settle something"):
        await consumer().ack(batch, outputs=[Output("out")])
    assert stream.sent == []


async def test_consumer_ack_with_outputs_refuses_two_streams_and_settles_nothing() -> None:
    one, two = FakeStream(), FakeStream()
    a, b = make_batch(one, 1), make_batch(two, 1)
    with pytest.raises(ValueError, match="one stream"):
        await consumer().ack(a, b, outputs=[Output("out")])
    assert not a.settled
    assert not b.settled
    assert one.sent == two.sent == []
    await consumer().ack(a, b)  # without outputs: one request per stream, as ever
    assert the_ack(one) == the_ack(two) == pb.Ack(batch_ids=[1])


async def test_a_transactional_stream_refuses_outputs_for_two_partitions() -> None:
    stream = FakeStream(transactional=True)
    p0 = make_batch(stream, 1, (("in", 0, 1),))
    p1 = make_batch(stream, 2, (("in", 1, 1),))
    with pytest.raises(ValueError, match="one partition"):
        await consumer().ack(p0, p1.records[0], outputs=[Output("out")])
    assert not p0.settled
    assert not p1.settled
    assert stream.sent == []
    # One partition is fine, and so are two without outputs or without transactions.
    await consumer().ack(p0, outputs=[Output("out")])
    await consumer().ack(p1)
    assert [list(r.ack.batch_ids) for r in stream.sent] == [[1], [2]]
    loose = FakeStream()
    await consumer().ack(
        make_batch(loose, 1, (("in", 0, 1),)),
        make_batch(loose, 2, (("in", 1, 1),)),
        outputs=[Output("out")],
    )
    assert list(the_ack(loose).batch_ids) == [1, 2]


async def test_bad_outputs_raise_before_the_batch_is_marked_settled() -> None:
    stream = FakeStream()
    batch = make_batch(stream)
    with pytest.raises(TypeError, match="list of Output"):
        await batch.ack(outputs=Output("out"))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Output values"):
        await batch.ack(outputs=[pb.OutputRecord(topic="out")])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        await consumer().ack(batch, outputs=["out"])  # type: ignore[list-item]
    assert not batch.settled
    assert stream.sent == []
    await batch.ack(outputs=[Output("out")])
    assert len(the_ack(stream).outputs) == 1


async def test_a_lost_stream_raises_stream_lost_with_outputs_too() -> None:
    stream = FakeStream(alive=False)
    with pytest.raises(StreamLostError):
        await make_batch(stream).ack(outputs=[Output("out")])
    with pytest.raises(StreamLostError):
        await consumer().ack(make_batch(stream), outputs=[Output("out")])
