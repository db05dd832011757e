"""Soak: a sidecar under steady load while the things that wear long-running consumers down
keep happening, checking that nothing is lost and that memory and file descriptors stay flat.

    scripts/soak [--minutes 30] [--rate 1000] [--broker-restart-every 300]
                 [--reconnect-every 60] [--report soak.json]

On the three-broker bed (scripts/soak starts it; bench/soak.py alone expects it running):

- one real `kafka-sidecar run` on the MSK IAM listeners, signing with the bed's short-session
  key: the broker ends every IAM session after 10 s (`LOCAL_KAFKA_SHORT_SESSION_MS`), so the
  sidecar reconnects and signs new tokens all the time, as it does on MSK at token expiry;
- a producer writing `--rate` records/s to a fresh 6-partition topic (replication factor 3)
  for the whole run, and an app (tests/chaos.py) acking each batch after a random delay;
- every `--broker-restart-every` seconds one broker gets a controlled restart (0, 1, 2, 0, ...)
  and the run waits for every replica to be back in sync;
- every `--reconnect-every` seconds the app drops its stream and opens a new one (the batches
  it held go back to the sidecar and are delivered again);
- every 5 s the sidecar's RSS and open file descriptors are sampled from /proc.

At the end: every produced record delivered, the group's commits at the end offsets, and RSS
and descriptors flat: the median of the last tenth of the run within 10% (descriptors: 10% or
3, whichever is more) of the median of the tenth after warm-up (20-30% of the run). Figures go
to stdout as `[figures] soak: ...`, progress to stderr, the exit code says whether every check
held (0) or not (1); `--report` writes it all as JSON (tests/test_soak.py reads it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.chaos import Cluster, Load, broker_command, metric  # noqa: E402
from tests.localkafka import LocalKafka  # noqa: E402
from tests.sidecarproc import SidecarProcess, aws_env, group_subscription  # noqa: E402
from tests.test_server import free_port  # noqa: E402

SAMPLE_EVERY_S = 5.0
PARTITIONS = 6


@dataclass
class Sample:
    at: float
    rss_mib: float
    fds: int


def sample(pid: int, started: float) -> Sample:
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS"))
    return Sample(time.monotonic() - started, rss_kib / 1024, len(os.listdir(f"/proc/{pid}/fd")))


def flatness(samples: list[Sample], duration: float) -> dict[str, float]:
    """Medians after warm-up (20-30% of the run) and at the end (last 10%), and the growth."""
    early = [s for s in samples if 0.2 * duration <= s.at < 0.3 * duration] or samples[:1]
    late = [s for s in samples if s.at >= 0.9 * duration] or samples[-1:]
    rss0 = statistics.median(s.rss_mib for s in early)
    rss1 = statistics.median(s.rss_mib for s in late)
    fds0 = statistics.median(s.fds for s in early)
    fds1 = statistics.median(s.fds for s in late)
    return {
        "rss_mib_early": rss0,
        "rss_mib_late": rss1,
        "rss_growth": rss1 / rss0 - 1,
        "fds_early": fds0,
        "fds_late": fds1,
        "fds_growth": fds1 / fds0 - 1,
    }


async def every(
    period: float, action: Callable[[], Awaitable[None] | None], first: float | None = None
) -> None:
    """Runs `action` every `period` seconds (the first time after `first`, default `period`);
    one that takes longer than the period delays the next."""
    await asyncio.sleep(period if first is None else first)
    while True:
        began = time.monotonic()
        result = action()
        if result is not None:
            await result
        await asyncio.sleep(max(0.0, period - (time.monotonic() - began)))


def progress(message: str) -> None:
    print(f"soak: {message}", file=sys.stderr, flush=True)


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    kafka = LocalKafka.ensure_started()
    if kafka.brokers != 3:
        raise SystemExit(
            "soak: needs the three-broker bed (scripts/local-kafka stop; "
            "scripts/local-kafka start --brokers 3), or run scripts/soak"
        )
    duration = args.minutes * 60
    topic = f"soak-{uuid.uuid4().hex[:10]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.plaintext)
    await admin.start()
    await admin.create_topics([NewTopic(topic, PARTITIONS, kafka.replication_factor)])
    sub = group_subscription("soak", topic, commit_interval_ms=1000)
    env = {
        **aws_env(kafka),
        "AWS_ACCESS_KEY_ID": kafka.short_session_access_key_id,
        "AWS_SECRET_ACCESS_KEY": kafka.short_session_secret_access_key,
    }
    metrics = f"127.0.0.1:{free_port()}"
    sidecar = SidecarProcess(
        kafka, [sub], metrics=metrics, env=env, extra={"log": {"level": "INFO"}}
    ).start()
    cluster = Cluster(kafka)
    load = Load(
        kafka, sidecar, metrics, sub, topic, records=int(args.rate * duration), rate=args.rate
    )
    samples: list[Sample] = []
    try:
        await sidecar.wait_serving()
        assert sidecar.proc is not None
        pid = sidecar.proc.pid
        progress(f"sidecar pid {pid} on {topic}; {args.minutes} min at {args.rate:.0f} records/s")
        await load.start(flowing=1)
        started = load.started
        broker = 0

        def take_sample() -> None:
            samples.append(sample(pid, started))

        def report_progress() -> None:
            last = samples[-1]
            progress(
                f"{time.monotonic() - started:.0f}s: delivered {sum(load.deliveries.values())}, "
                f"RSS {last.rss_mib:.0f} MiB, {last.fds} fds"
            )

        restarting = asyncio.Lock()

        async def restart_next() -> None:
            nonlocal broker
            async with restarting:
                await restart(broker)
            broker = (broker + 1) % 3

        async def restart(broker: int) -> None:
            progress(f"{time.monotonic() - started:.0f}s: restarting broker {broker}")
            async with load.fault(f"restart broker {broker}"):
                await broker_command("restart", broker)
                waited = await cluster.wait_in_sync([topic, "__consumer_offsets"])
            progress(f"{time.monotonic() - started:.0f}s: in sync again after {waited:.0f}s")

        async with asyncio.TaskGroup() as group:
            ticking = [
                group.create_task(every(SAMPLE_EVERY_S, take_sample, first=0)),
                group.create_task(every(60, report_progress)),
                group.create_task(every(args.reconnect_every, load.reconnect)),
                group.create_task(every(args.broker_restart_every, restart_next)),
            ]
            await asyncio.sleep(duration - (time.monotonic() - started))
            async with restarting:  # a restart under way ends first
                for task in ticking:
                    task.cancel()
        progress("load done; waiting for the last commits")
        await load.finish()
        refreshes = await metric(metrics, "kafka_sidecar_token_refreshes_total")
    finally:
        load.stop()
        sidecar.stop()
        await admin.delete_topics([topic])
        await admin.close()
    flat = flatness(samples, duration)
    lost = len(load.produced - set(load.deliveries))
    checks = {
        "nothing_lost": lost == 0 and load.produce_failures == 0,
        "rss_flat": flat["rss_growth"] <= 0.10,
        "fds_flat": flat["fds_late"] - flat["fds_early"] <= max(0.10 * flat["fds_early"], 3),
    }
    report = {
        "minutes": args.minutes,
        "produced": len(load.produced),
        "delivered": sum(load.deliveries.values()),
        "lost": lost,
        "duplicates": load.duplicates,
        "broker_restarts": len(load.faults),
        "streams_opened": load.streams_opened,
        "broker_reconnects": load.reconnects,
        "token_refreshes": refreshes,
        "downtime_s": load.max_gap(),
        **flat,
        "checks": checks,
        "samples": [asdict(s) for s in samples],
    }
    print(
        "[figures] soak: "
        + ", ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in report.items()
            if k not in ("samples", "checks")
        )
        + f", checks={checks}"
    )
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--rate", type=float, default=1000, help="records/s produced")
    parser.add_argument("--broker-restart-every", type=float, default=300, metavar="SECONDS")
    parser.add_argument("--reconnect-every", type=float, default=60, metavar="SECONDS")
    parser.add_argument("--report", type=Path, help="write the figures and samples as JSON")
    args = parser.parse_args()
    # The load's own producer and admin clients retry through the restarts; their complaints
    # would drown the progress lines (the sidecar's are in its log).
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    report = asyncio.run(soak(args))
    if args.report:
        args.report.write_text(json.dumps(report, indent=2))
    sys.exit(0 if all(report["checks"].values()) else 1)


if __name__ == "__main__":
    main()
