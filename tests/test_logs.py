"""What the aiokafka filter makes of aiokafka's own log lines (pure: no broker)."""

from __future__ import annotations

import logging

from aiokafka import errors

from sidecar.logs import AiokafkaNoise


def line(msg: str, *args: object, level: int = logging.ERROR) -> logging.LogRecord:
    return logging.LogRecord("aiokafka.consumer.group_coordinator", level, "", 0, msg, args, None)


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


def test_a_missing_topic_on_every_metadata_refresh_is_dropped() -> None:
    assert not AiokafkaNoise().filter(line("Topic %s not found in cluster metadata", "t"))
