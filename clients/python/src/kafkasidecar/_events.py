"""The typed events: everything a stream tells the app besides batches.

They are plain frozen values, not the wire messages, so that an app matches on a class and
reads named fields, and the client's own happenings (connected, disconnected) look the same
as the sidecar's (rebalances, rejections, shutdown).
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from kafkasidecar._models import RecordRef, TopicPartition
from kafkasidecar.v1 import consumer_pb2 as pb


class RejectReason(enum.IntEnum):
    """Why the sidecar refused (part of) an ack or nack; mirrors ``RejectReason`` in the API."""

    UNSPECIFIED = pb.REJECT_REASON_UNSPECIFIED
    #: No such batch or record on this stream.
    UNKNOWN = pb.REJECT_REASON_UNKNOWN
    #: Already acked or dead-lettered.
    ALREADY_SETTLED = pb.REJECT_REASON_ALREADY_SETTLED
    #: Its partition was revoked; the record goes to the partition's next owner.
    REVOKED = pb.REJECT_REASON_REVOKED
    #: Malformed, or not supported by this sidecar (e.g. no dead-letter topic configured).
    INVALID = pb.REJECT_REASON_INVALID
    #: Its ack deadline passed: it was taken back and redelivered.
    EXPIRED = pb.REJECT_REASON_EXPIRED

    @classmethod
    def of(cls, value: int) -> RejectReason:
        try:
            return cls(value)
        except ValueError:
            return cls.UNSPECIFIED


@dataclass(frozen=True, slots=True)
class Connected:
    """A stream is open: the first one, or a new one after the sidecar came back."""

    opened: pb.Opened
    reconnected: bool


@dataclass(frozen=True, slots=True)
class Disconnected:
    """The stream ended unexpectedly; records held from it will be redelivered.

    ``retry_in`` is the delay before the next attempt (None: the consumer gives up).
    """

    error: BaseException | None
    retry_in: float | None


@dataclass(frozen=True, slots=True)
class PartitionsAssigned:
    partitions: tuple[TopicPartition, ...]


@dataclass(frozen=True, slots=True)
class PartitionsRevoked:
    """These partitions left this sidecar: acks for their records come back as `Rejected`."""

    partitions: tuple[TopicPartition, ...]


@dataclass(frozen=True, slots=True)
class CaughtUp:
    """Snapshot subscriptions: every partition reached the end offsets seen at (re)start."""

    end_offsets: dict[TopicPartition, int]


@dataclass(frozen=True, slots=True)
class Rejected:
    """Some refs of an ack or nack could not be applied; the stream stays open."""

    batch_ids: tuple[int, ...]
    records: tuple[RecordRef, ...]
    reason: RejectReason
    message: str


@dataclass(frozen=True, slots=True)
class Draining:
    """The sidecar is shutting down: no more batches; settle what you hold within the deadline.

    The stream then ends and the consumer reconnects (to the restarted sidecar) on its own.
    """

    deadline_ms: int


Event = (
    Connected
    | Disconnected
    | PartitionsAssigned
    | PartitionsRevoked
    | CaughtUp
    | Rejected
    | Draining
)
E = TypeVar("E")
#: A callback: plain or async. Async ones are awaited before the next message is read.
Callback = Callable[[E], Awaitable[None] | None]
