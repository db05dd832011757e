"""The soak's CI version: bench/soak.py for 3 minutes on the three-broker bed (IAM sessions ending
every 10 s, a broker restart every minute, the app's stream reconnecting every minute): nothing
lost, commits at the end offsets, RSS and file descriptors flat. `scripts/soak` runs 30 minutes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.localkafka import ROOT, LocalKafka

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(900)]


def test_soak_three_minutes(kafka: LocalKafka, tmp_path: Path) -> None:
    assert kafka.brokers == 3
    report_path = tmp_path / "soak.json"
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "soak.py"),
            "--minutes=3",
            "--broker-restart-every=60",
            "--reconnect-every=60",
            f"--report={report_path}",
        ],
        capture_output=True,
        text=True,
        timeout=800,
    )
    print(run.stdout)
    assert run.returncode == 0, run.stdout + run.stderr[-5000:]
    report = json.loads(report_path.read_text())
    assert report["checks"] == {"nothing_lost": True, "rss_flat": True, "fds_flat": True}
    assert report["produced"] == report["delivered"] - report["duplicates"] == 180_000
    assert report["lost"] == 0
    assert report["broker_restarts"] == 2
    # The short-session key: the broker ended a session every 10 s, and the sidecar came back.
    assert report["broker_reconnects"] >= 10
    assert report["streams_opened"] >= 3
