"""What the aiokafka filter makes of aiokafka's own log lines (pure: no broker)."""

from __future__ import annotations

import logging

from aiokafka import errors

from sidecar.logs import AiokafkaNoise


def line(msg: str, *args: object, level: int = logging.ERROR, at: float = 0) -> logging.LogRecord:
    record = logging.LogRecord("aiokafka.consumer.group_coordinator", level, "", 0, msg, args, None)
    if at:
        record.created = at
    return record


def test_a_retriable_coordinator_lookup_failure_is_a_warning() -> None:
    noise = AiokafkaNoise()
    for error in (errors.GroupCoordinatorNotAvailableError(), errors.NotCoordinatorError()):
        record = line("Group Coordinator Request failed: %s", error)
        assert noise.filter(record)
        assert record.levelname == "WARNING", error


def test_a_fatal_coordinator_lookup_failure_stays_an_error() -> None:
    record = line("Group Coordinator Request failed: %s", errors.GroupAuthorizationFailedError())
    assert AiokafkaNoise().filter(record)
    assert record.levelname == "ERROR"


def test_dropped_connections_become_counted_info_lines() -> None:
    noise = AiokafkaNoise()
    record = line("Unable to update metadata from %s", 1)
    assert noise.filter(record)
    assert (record.levelname, noise.reconnects) == ("INFO", 1)


def test_what_the_sidecar_says_itself_is_dropped() -> None:
    """A missing topic (every metadata refresh) and a topic the principal may not read (every
    poll): the sidecar logs those itself, naming the config key or the IAM permission."""
    assert not AiokafkaNoise().filter(line("Topic %s not found in cluster metadata", "t"))
    denied = line("Not authorized to read from topic %s.", "t", level=logging.WARNING)
    assert not AiokafkaNoise().filter(denied)


def test_a_broker_that_is_down_is_one_warning_per_kind_every_ten_seconds() -> None:
    """A broker down for 25 s: aiokafka's ten error lines a second become a warning per kind
    every 10 s, each saying how many lines it stands for; another broker has its own."""
    noise = AiokafkaNoise()
    connect = "Unable connect to node with id %s: %s"
    fetch = "Failed fetch messages from %s: %s"
    refused = ConnectionRefusedError(111, "Connect call failed")
    passed: list[logging.LogRecord] = []
    for tick in range(250):
        at = 1000 + tick / 10
        for record in (
            line(connect, 0, refused, at=at),
            line(fetch, 0, errors.NodeNotReadyError(), at=at),
        ):
            if noise.filter(record):
                passed.append(record)
    assert [(r.msg, r.created) for r in passed] == [
        (connect, 1000),
        (fetch, 1000),
        (connect, 1010),
        (fetch, 1010),
        (connect, 1020),
        (fetch, 1020),
    ]
    assert {r.levelname for r in passed} == {"WARNING"}
    assert [getattr(r, "repeated", 0) for r in passed] == [0, 0, 99, 99, 99, 99]
    other = line(connect, 2, refused, at=1020.5)
    assert noise.filter(other)
    assert other.levelname == "WARNING"
