"""The client's errors: one base class, so an app can catch everything the client raises.

They tell apart what an app handles differently: a batch it can no longer settle (skip it,
the sidecar redelivers), a stream refused for good (a config or auth bug), and a sidecar
that stayed away.
"""

from __future__ import annotations

import grpc


class SidecarError(Exception):
    """Base of this client's errors."""


class StreamLostError(SidecarError):
    """The stream that delivered a batch has ended, so its records can no longer be settled.

    Nothing is lost: the sidecar took the records back when the stream ended and redelivers
    them (``delivery_attempt`` + 1), usually on the consumer's next stream.
    """


class StreamError(SidecarError):
    """The sidecar refused the stream for good (e.g. unknown subscription, wrong token)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class SidecarUnavailableError(SidecarError):
    """No stream could be opened (and reconnecting is off, or `reconnect_timeout` passed)."""
