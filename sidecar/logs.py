"""Logging as one JSON object per line, so log pipelines need no parsing rules.

Context goes in `extra={...}` (subscription, topic, partition, ...) and comes out as fields.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class AiokafkaNoise(logging.Filter):
    """Keeps aiokafka's routine events from looking like failures.

    aiokafka logs every dropped broker connection at error level. On MSK that happens at
    every session end (about every 15 minutes per connection: aiokafka cannot re-authenticate,
    KIP-368) and aiokafka reconnects by itself, so these become info lines, counted. It also
    logs a missing subscribed topic at error level on every metadata refresh (ten times a
    second), and a topic it may not read on every poll; the sidecar says those itself, with
    what to do, so aiokafka's are dropped. A coordinator lookup that
    fails with a retriable error (a broker starting, restarting or moving the group) is retried
    by aiokafka too: a warning, not an error.

    A broker that is down (MSK patching restarts brokers one at a time; one may fail) makes
    aiokafka log each connection attempt and each fetch it could not send to it, about ten
    error lines a second, while the other brokers' leaders take over its partitions. Those are
    warnings, one per broker and kind every `UNREACHABLE_EVERY_S`, with the count of the lines
    they stand for (`repeated`). A broker that stays away shows as lag and stalled partitions
    (kafka_sidecar_partition_stalled), not as log volume.
    """

    _RECONNECT_SIGNS = ("KafkaConnectionError", "coordinator dead", "Connection at ")
    #: Follows a connection the broker closed mid-request (aiokafka retries on its own).
    _RECONNECT_TEMPLATES = frozenset({"Unable to update metadata from %s"})
    _COORDINATOR_LOOKUP = "Group Coordinator Request failed: %s"
    #: Said by the sidecar itself, once and with what to do (a missing topic; a fetch the
    #: broker refuses, with the IAM permission it lacks), where aiokafka repeats it per poll.
    _SAID_BY_THE_SIDECAR = frozenset(
        {"Topic %s not found in cluster metadata", "Not authorized to read from topic %s."}
    )
    #: aiokafka's lines for a broker it cannot reach (first argument: the node or the host).
    _UNREACHABLE_TEMPLATES = frozenset(
        {
            "Unable connect to node with id %s: %s",
            'Unable connect to "%s:%s": %s',
            "Failed fetch messages from %s: %s",
            "Failed fetch offsets from %s: %s",
        }
    )
    UNREACHABLE_EVERY_S = 10.0

    def __init__(self) -> None:
        super().__init__()
        self.reconnects = 0
        #: (template, broker) -> (when its last line went out, lines held back since)
        self._unreachable: dict[tuple[str, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or not record.name.startswith("aiokafka"):
            return True
        if record.msg in self._SAID_BY_THE_SIDECAR:
            return False
        args = record.args if isinstance(record.args, tuple) else ()
        if record.msg == self._COORDINATOR_LOOKUP:
            if getattr(args[0] if args else None, "retriable", False):
                record.levelno, record.levelname = logging.WARNING, "WARNING"
            return True
        if record.msg in self._UNREACHABLE_TEMPLATES:
            return self._unreachable_broker(record, str(args[0]) if args else "")
        message = record.getMessage()
        if record.msg in self._RECONNECT_TEMPLATES or any(
            sign in message for sign in self._RECONNECT_SIGNS
        ):
            record.levelno, record.levelname = logging.INFO, "INFO"
            self.reconnects += 1
        return True

    def _unreachable_broker(self, record: logging.LogRecord, broker: str) -> bool:
        key = (str(record.msg), broker)
        last, held = self._unreachable.get(key, (-self.UNREACHABLE_EVERY_S, 0))
        if record.created - last < self.UNREACHABLE_EVERY_S:
            self._unreachable[key] = (last, held + 1)
            return False
        self._unreachable[key] = (record.created, 0)
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        if held:
            record.repeated = held
        return True


#: Counts broker disconnects aiokafka recovered from (for metrics).
aiokafka_noise = AiokafkaNoise()


def configure(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(aiokafka_noise)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiokafka logs every reconnect at error level; MSK ends sessions every token lifetime,
    # so those are routine here. Keep its warnings, drop its noise.
    logging.getLogger("aiokafka").setLevel(max(logging.getLevelName(level), logging.WARNING))
    # botocore's debug output includes canonical requests and signatures: an MSK IAM token
    # could be rebuilt from it. Never let it through, whatever the configured level.
    for name in ("botocore", "boto3", "urllib3", "aws_msk_iam_sasl_signer"):
        logging.getLogger(name).setLevel(max(logging.getLevelName(level), logging.INFO))
