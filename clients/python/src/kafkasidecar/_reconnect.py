"""When a consumer reopens a stream that broke, and how long it waits first.

A sidecar restarts with its pod's rollouts, so a broken stream is usually retried; but a
request the sidecar refuses would only be refused again, and many apps retrying in step
would hit a restarting sidecar all at once.
"""

from __future__ import annotations

import random

import grpc

#: Status codes that mean "this request is wrong", not "the sidecar is away": reconnecting
#: would only repeat them, so they end the consumer.
FATAL_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.FAILED_PRECONDITION,
    }
)


def backoff(failures: int, initial: float, maximum: float) -> float:
    """Seconds to wait after `failures` failed attempts in a row: doubling, capped, jittered."""
    ceiling = min(initial * 2.0 ** max(failures - 1, 0), maximum)
    return float(ceiling * random.uniform(0.5, 1.0))
