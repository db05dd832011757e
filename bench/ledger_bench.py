"""Throughput of the settlement ledger on the per-record hot path.

Tracks 1M records and settles them, once in offset order and once shuffled within windows of
1000 (acks from parallel app workers), through ``Ledger`` as the consumer loop calls it. Timing
lives here rather than in tests (docs/DESIGN.md §7).

Run: .venv/bin/python bench/ledger_bench.py [--records N] [--window W] [--repeat R]
"""

from __future__ import annotations

import argparse
import random
import time

from sidecar.ledger import Ledger, SettleOutcome, TopicPartition

TP: TopicPartition = ("bench", 0)


def settle_order(records: int, window: int, shuffled: bool, seed: int) -> list[int]:
    """Offsets in the order the app settles them: each window of ``window`` records is tracked
    before any of it settles, and within a window acks come in order or shuffled."""
    rng = random.Random(seed)
    order: list[int] = []
    for base in range(0, records, window):
        chunk = list(range(base, min(base + window, records)))
        if shuffled:
            rng.shuffle(chunk)
        order.extend(chunk)
    return order


def run(records: int, window: int, acks: list[int]) -> float:
    """Seconds to track and settle every record, tracking one window ahead of the acks."""
    ledger = Ledger()
    ledger.assign(TP, 0)
    track = ledger.track
    settle = ledger.settle
    started = time.perf_counter()
    for base in range(0, records, window):
        end = min(base + window, records)
        for offset in range(base, end):
            track(TP, offset)
        for offset in acks[base:end]:
            settle(TP, offset)
    elapsed = time.perf_counter() - started
    partition = ledger.partition(TP)
    if partition is None or partition.commit_offset() != records or ledger.unsettled:
        raise SystemExit("benchmark did not settle every record")
    if settle(TP, 0) is not SettleOutcome.ALREADY_SETTLED:
        raise SystemExit("benchmark ledger forgot what it settled")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--window", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3, help="best of R runs")
    args = parser.parse_args()
    for name, shuffled in (("in order", False), (f"shuffled within {args.window}", True)):
        acks = settle_order(args.records, args.window, shuffled, seed=1)
        best = min(run(args.records, args.window, acks) for _ in range(args.repeat))
        print(
            f"{name:>24}: {args.records / best:>12,.0f} records/s "
            f"(track+settle of {args.records:,} records in {best:.3f} s)"
        )


if __name__ == "__main__":
    main()
