"""The dashboard's picture (docs/img/dashboard.png, scripts/dashboard-picture): a short run of
bench/dashboard_picture.py end to end, a real sidecar under load with a stall in the middle,
scraped by a real Prometheus (scripts/ensure-prometheus), every panel queried and drawn.

It asserts what makes the picture worth having: a real PNG of the documented size, data in
the panels (the ones allowed to be empty named, with why), and the stall visible in the data
(partition 0 of `orders` moving, stalled, moving again) while the rest stays healthy.
About 80 s of wall time once Prometheus is built (60 s of load); the build itself is minutes,
once per machine.
"""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.clienttools import ensure_tool
from tests.test_dashboard import all_panels, dashboard

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "dashboard_picture.py"

# Slow (a minute of load) but part of every run, CI's included: nothing deselects `slow`.
# The timeout leaves room for the first run on a machine, which builds Prometheus.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

#: The picture's geometry, as bench/dashboard_picture.py documents it: 75 px per grid column
#: (24 of them), 36 px per grid unit of height, a 110 px header.
WIDTH = 24 * 75
PX_PER_ROW, HEADER_PX = 36, 110

#: Panels that may have no data at all in a one-minute run.
MAY_BE_EMPTY: set[str] = set()
#: (panel, series) that have no point by design.
EMPTY_SERIES: set[tuple[str, str]] = set()


@pytest.fixture(scope="session")
def prometheus() -> str:
    return ensure_tool("ensure-prometheus")


@pytest.fixture(scope="module")
def picture(
    prometheus: str, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("picture")
    png, report = out / "dashboard.png", out / "report.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--seconds",
            "60",
            "--out",
            str(png),
            "--report",
            str(report),
            "--prometheus",
            prometheus,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr[-6000:]}"
    loaded: dict[str, Any] = json.loads(report.read_text())
    return png, loaded


def series_of(report: dict[str, Any], title: str, kind: str) -> list[dict[str, Any]]:
    (panel,) = [p for p in report["panels"] if p["title"] == title and p["type"] == kind]
    return [s for t in panel["targets"] for s in t["series"]]


def test_the_picture_is_a_png_of_the_dashboards_size(picture: tuple[Path, dict[str, Any]]) -> None:
    from PIL import Image

    png, report = picture
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])  # IHDR
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in dashboard()["panels"])
    assert (width, height) == (WIDTH, HEADER_PX + rows * PX_PER_ROW)
    assert (report["width"], report["height"]) == (width, height)
    with Image.open(png) as image:
        image.load()  # decodes every row: a truncated file fails here
        colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
    # Panels, lines, fills and text, not a blank canvas.
    assert colours is not None
    assert len(colours) > 50, len(colours)
    assert len(data) < 800_000, len(data)


def test_every_panel_was_queried_and_nearly_all_have_data(
    picture: tuple[Path, dict[str, Any]],
) -> None:
    _, report = picture
    assert report["errors"] == []
    board = {p["id"]: p for p in all_panels(dashboard()) if p["type"] != "row"}
    panels = {p["id"]: p for p in report["panels"]}
    assert panels.keys() == board.keys()
    for panel_id, panel in panels.items():
        title = panel["title"]
        assert [t["refId"] for t in panel["targets"]] == [
            t["refId"] for t in board[panel_id]["targets"]
        ]
        if title in MAY_BE_EMPTY:
            continue
        assert panel["points"] > 0, f"{title}: no data"
        for target in panel["targets"]:
            assert target["series"], f"{title} {target['refId']}: no series"
            for series in target["series"]:
                if (title, series["name"]) in EMPTY_SERIES:
                    assert series["points"] == 0, (title, series["name"])
                    continue
                assert series["points"] > 0, f"{title}: {series['name']} has no point"
    # The variables resolved as the dashboard's label_values queries do.
    variables = report["variables"]
    assert (variables["namespace"], variables["pod"]) == ("shop", "orders-7c9f6d5b8-x2k4q")
    assert variables["subscription"] == "(enrich|orders)"


def test_the_stall_shows_and_clears_while_the_rest_stays_healthy(
    picture: tuple[Path, dict[str, Any]],
) -> None:
    _, report = picture
    topic = report["held"].split("[")[0]
    assert re.fullmatch(rf"{topic}\[0\] offset \d+", report["held"]), report["held"]
    assert len(report["stall_logged"]) == 1
    assert report["stall_logged"][0].startswith("partition stalled")

    timeline = {
        s["name"]: s["values"] for s in series_of(report, "Stalled partitions", "state-timeline")
    }
    assert set(timeline) == {f"{sub} {topic}/{p}" for sub in ("orders", "enrich") for p in range(3)}
    for name, values in timeline.items():
        seen = [v for v in values if v is not None]
        if name == f"orders {topic}/0":
            # moving, then stalled (after stall_after_ms), then moving again: in that order.
            changes = [v for i, v in enumerate(seen) if i == 0 or v != seen[i - 1]]
            assert changes == [0, 1, 0], changes
            # It turned 1 within the hold, stall_after_ms (5 s) after it began, give or take
            # the scrape and the sidecar's check interval.
            start, step = report["start"], report["step"]
            first = start + step * values.index(1)
            held_from, held_until = report["hold"]
            assert held_from + 4 <= first <= held_from + 5 + 4, first - held_from
            last = start + step * (len(values) - 1 - values[::-1].index(1))
            assert last <= held_until + 4
        else:
            assert set(seen) == {0}, name

    (stat,) = series_of(report, "Stalled partitions", "stat")
    assert (stat["max"], stat["last"]) == (1, 0)
    (not_serving,) = series_of(report, "Subscriptions not serving", "stat")
    assert not_serving["max"] == 0
    (streams,) = series_of(report, "App streams attached", "stat")
    assert streams["last"] == 3
    (dead,) = series_of(report, "Dead-lettered in range", "stat")
    assert dead["last"] > 0
    lag = {
        s["name"]: s["max"]
        for s in series_of(report, "Consumer lag per partition (settled lag)", "timeseries")
    }
    # The held partition's lag grew with what was produced meanwhile; the others did not.
    assert lag[f"orders {topic}/0"] > 5 * max(lag[f"orders {topic}/{p}"] for p in (1, 2))
    outcomes = {
        s["name"]: s["max"] for s in series_of(report, "Transactions by outcome", "timeseries")
    }
    assert outcomes["enrich committed"] > 0
