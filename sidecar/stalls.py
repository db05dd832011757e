"""Stall detection: partitions whose commit stopped moving while something is owed.

A commit that does not move is normal when nothing is owed (an idle partition); it is a stall
when records are unsettled or the partition has lag, for longer than `stall_after_ms`. That is
what an operator needs paged about (a stuck record, an app that stopped acking, a fetch that
cannot go on), and the sidecar is the one place that knows where the record holding the commit
back is.

Pure: the caller passes the commit offsets, what is owed and `now`.
"""

from __future__ import annotations

from dataclasses import dataclass

from sidecar.batcher import TopicPartition


@dataclass(frozen=True, slots=True)
class Stall:
    #: The commit offset that has not moved (the lowest unsettled record, or the next one).
    offset: int
    #: Monotonic time the commit last moved (or something became owed).
    since: float


class Stalls:
    """Per partition: when its commit last moved, and whether it is stalled now."""

    def __init__(self, after_s: float) -> None:
        self.after_s = after_s
        #: Per partition: the commit offset, and since when it stood there with records owed
        #: (None while nothing is owed).
        self._moved: dict[TopicPartition, tuple[int, float | None]] = {}
        #: The partitions stalled now.
        self.stalled: dict[TopicPartition, Stall] = {}

    def check(self, tp: TopicPartition, commit: int, owed: bool, now: float) -> Stall | None:
        """Takes in one partition's commit offset and whether records are owed there
        (unsettled, or lag); returns its Stall when it has just become stalled."""
        offset, since = self._moved.get(tp, (commit, None))
        if offset != commit or not owed:
            self._moved[tp] = (commit, now if owed else None)
            self.stalled.pop(tp, None)
            return None
        if since is None:
            self._moved[tp] = (commit, now)
            return None
        if now - since < self.after_s or tp in self.stalled:
            return None
        stall = self.stalled[tp] = Stall(offset, since)
        return stall

    def keep(self, tps: set[TopicPartition]) -> None:
        """Forgets partitions no longer assigned."""
        for tp in [tp for tp in self._moved if tp not in tps]:
            del self._moved[tp]
            self.stalled.pop(tp, None)
