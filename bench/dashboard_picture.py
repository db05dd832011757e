"""A picture of the Grafana dashboard, populated by a real run: docs/img/dashboard.png.

    scripts/dashboard-picture [--seconds 200] [--out docs/img/dashboard.png]

What it runs, all on this machine:

- the local broker (scripts/local-kafka, started if it is not running) and three fresh topics:
  the input (3 partitions), the app's outputs (3) and a dead-letter topic (1), deleted at the end;
- one real `kafka-sidecar run` (tests/sidecarproc.py) on the broker's MSK IAM listener, so the
  token panels have data, `/metrics` on a free port, and two subscriptions of the input topic
  (`stall_after_ms` 5 s, `ordering: partition`): `orders` with the dead-letter topic, `enrich`
  with output transactions;
- Prometheus (scripts/ensure-prometheus, the pinned release) in a temp dir, scraping that port
  every second as job `kafka-sidecar` with the static labels `namespace` and `pod` that the
  dashboard's variables select on (in Kubernetes the ServiceMonitor's scrape adds them);
- a producer writing `--rate` records/s, and an app that works a little on each batch: two
  `orders` streams ack it, nacking about 1 record in 50 for a retry (acked when it comes back)
  and 1 in 200 to the dead letters; one `enrich` stream acks each batch with one output per
  record (written in the partition's transaction with the commit);
- the stall: from 35% to 60% of the run, the app holds one `orders` record of partition 0
  unacked (acking everything else) and then acks it. Its commit stands still, the partition's
  lag grows (nothing behind the record is delivered under `ordering: partition`),
  `kafka_sidecar_partition_stalled` turns 1 after `stall_after_ms` and back to 0 once the commit
  moves.

Then every target of every panel of charts/kafka-sidecar/dashboards/kafka-sidecar.json goes to
Prometheus's /api/v1/query_range over the run, as Grafana would send it: `$namespace`, `$pod`
and `$subscription` resolved like the dashboard's `label_values` variables (all values),
`$__rate_interval` as Grafana computes it for a 1 s scrape (at least 5 s here), `$__range` the
run. The panels are drawn with matplotlib on the dashboard's grid (24 columns, rows as in the
JSON): time series with a legend table (last, max), stats as their last value coloured by the
panel's thresholds, the stall state timeline in the panel's colours. The PNG is
`PX_PER_COLUMN` x 24 wide and `PX_PER_ROW` per grid unit of height plus `HEADER_PX` high. The
shaded band on the time series is the hold (an annotation of the picture, not a query).

Progress goes to stderr, a summary (per panel: series and points) to stdout; `--report` also
writes it as JSON (tests/test_dashboard_picture.py reads it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import math
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import yaml
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kafkasidecar.v1 import consumer_pb2 as pb
from tests.localkafka import LocalKafka
from tests.sidecarproc import AppStream, SidecarProcess, group_subscription, ref, stop_process
from tests.test_failures import nack

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "charts" / "kafka-sidecar" / "dashboards" / "kafka-sidecar.json"
DEFAULT_OUT = ROOT / "docs" / "img" / "dashboard.png"

#: The picture's geometry: Grafana's grid is 24 columns wide, a grid unit of height 30 px
#: plus margins; these are a little larger so the legends stay legible.
PX_PER_COLUMN = 75
PX_PER_ROW = 36
HEADER_PX = 110
DPI = 100

#: The subscriptions, both of the input topic: `orders` acks plainly (retries, dead letters and
#: the stall are its), `enrich` acks every batch with outputs in transactions.
ORDERS, ENRICH = "orders", "enrich"
NAMESPACE = "shop"
POD = "orders-7c9f6d5b8-x2k4q"
SCRAPE_INTERVAL_S = 1
#: The hold, as fractions of the run.
HOLD_FROM, HOLD_UNTIL = 0.35, 0.6
#: Legend rows drawn per time series panel (the rest are counted).
LEGEND_ROWS = 6
#: Time axis tick spacings to choose from, in seconds.
TICK_STEPS = (5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600)

#: Grafana's classic palette, in its order (palette-classic).
PALETTE = (
    "#7EB26D",
    "#EAB839",
    "#6ED0E0",
    "#EF843C",
    "#E24D42",
    "#1F78C1",
    "#BA43A6",
    "#705DA0",
    "#508642",
    "#CCA300",
    "#447EBC",
    "#C15C17",
)
#: Grafana's named colours used by the dashboard's thresholds and mappings.
NAMED_COLOURS = {
    "green": "#73BF69",
    "red": "#F2495C",
    "orange": "#FF9830",
    "yellow": "#FADE2A",
    "blue": "#5794F2",
}
HOLD_SHADE = "#F2495C"

Panel = dict[str, Any]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- Prometheus ---------------------------------------------------------------------------


def ensure_prometheus() -> str:
    log("prometheus: scripts/ensure-prometheus (the first run on a machine builds it)")
    proc = subprocess.run(
        [str(ROOT / "scripts" / "ensure-prometheus")],
        stdout=subprocess.PIPE,
        text=True,
        check=True,
    )
    return proc.stdout.strip().splitlines()[-1]


class Prometheus:
    """A Prometheus server in a temp dir, scraping one sidecar's /metrics every second."""

    def __init__(self, binary: str, target: str, folder: Path) -> None:
        self.binary = binary
        self.folder = folder
        self.address = f"127.0.0.1:{free_port()}"
        config = {
            "global": {
                "scrape_interval": f"{SCRAPE_INTERVAL_S}s",
                "scrape_timeout": f"{SCRAPE_INTERVAL_S}s",
                "evaluation_interval": f"{SCRAPE_INTERVAL_S}s",
            },
            "scrape_configs": [
                {
                    "job_name": "kafka-sidecar",
                    "static_configs": [
                        {"targets": [target], "labels": {"namespace": NAMESPACE, "pod": POD}}
                    ],
                }
            ],
        }
        self.config_path = folder / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = folder / "prometheus.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                [
                    self.binary,
                    f"--config.file={self.config_path}",
                    f"--storage.tsdb.path={self.folder / 'data'}",
                    f"--web.listen-address={self.address}",
                    "--storage.tsdb.retention.time=1d",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    async def wait_ready(self) -> None:
        async with asyncio.timeout(60):
            while True:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise RuntimeError(f"prometheus exited:\n{self.log_path.read_text()[-3000:]}")
                with contextlib.suppress(OSError):
                    await asyncio.to_thread(self._get, "/-/ready")
                    return
                await asyncio.sleep(0.2)

    def _get(self, path: str, params: dict[str, Any] | None = None) -> Any:
        query = f"?{urllib.parse.urlencode(params, doseq=True)}" if params else ""
        with urllib.request.urlopen(f"http://{self.address}{path}{query}", timeout=30) as r:
            body = r.read()
        return json.loads(body) if path.startswith("/api/") else body

    def api(self, path: str, **params: Any) -> Any:
        reply = self._get(f"/api/v1/{path}", params)
        if reply.get("status") != "success":
            raise RuntimeError(f"prometheus {path} {params}: {reply}")
        return reply["data"]

    def stop(self) -> None:
        stop_process(self.proc)


# --- The load -----------------------------------------------------------------------------


@dataclass
class Load:
    """What the producer and the app did, for the summary."""

    produced: int = 0
    acked: int = 0
    with_outputs: int = 0
    retried: int = 0
    dead_lettered: int = 0
    held: str = ""
    hold_started: float = 0.0
    hold_ended: float = 0.0
    errors: list[str] = field(default_factory=list)


async def produce(kafka: LocalKafka, topic: str, rate: int, until: float, load: Load) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=kafka.plaintext, acks="all", linger_ms=20)
    await producer.start()
    try:
        tick = 0.1
        started = time.monotonic()
        while (now := time.monotonic()) < until:
            due = int((now - started) * rate) - load.produced
            for _ in range(max(due, 0)):
                i = load.produced
                value = json.dumps({"order": i, "items": i % 7 + 1, "pad": "x" * 150}).encode()
                await producer.send(topic, value, key=b"customer-%d" % (i % 500))
                load.produced += 1
            await asyncio.sleep(tick)
        await producer.flush()
    finally:
        await producer.stop()


class App:
    """The app: two `orders` streams (retries, dead letters, and one record of partition 0 held
    during the stall) and one `enrich` stream (every batch acked with an output per record)."""

    def __init__(self, output_topic: str, hold: tuple[float, float], load: Load) -> None:
        self.output_topic = output_topic
        self.hold_from, self.hold_until = hold
        self.load = load
        self.random = random.Random(14)

    async def stream(
        self, channel: grpc.aio.Channel, subscription: str, stop: asyncio.Event
    ) -> None:
        app = AppStream(channel, keep=False)
        await app.open(subscription)
        try:
            while not stop.is_set():
                try:
                    response = await app.next(timeout=1)
                except TimeoutError:
                    continue
                kind = response.WhichOneof("kind")
                if kind == "batch":
                    await asyncio.sleep(0.03 + 0.0005 * len(response.batch.records))  # work
                    if subscription == ENRICH:
                        self.enrich(app, response.batch)
                    else:
                        self.orders(app, response.batch)
                elif kind == "rejected":
                    problem = f"{subscription}: rejected: {response.rejected}".strip()
                    log(f"app: {problem}")
                    self.load.errors.append(problem)
        finally:
            app.close()

    def orders(self, app: AppStream, batch: pb.Batch) -> None:
        records = list(batch.records)
        now = time.monotonic()
        if not self.load.held and self.hold_from <= now < self.hold_until:
            held = next((r for r in records if r.partition == 0), None)
            if held is not None:
                records.remove(held)
                self.load.held = f"{held.topic}[{held.partition}] offset {held.offset}"
                self.load.hold_started = time.time()
                log(f"app: holding {ORDERS} {self.load.held} unacked (the stall)")
                loop = asyncio.get_running_loop()
                loop.call_later(self.hold_until - now, self.release, app, held)
        for record in list(records):
            if record.delivery_attempt > 1:
                continue  # a retried record is acked when it comes back
            roll = self.random.random()
            if roll < 0.005:
                records.remove(record)
                app.send(nack([record], pb.NACK_ACTION_DEAD_LETTER, reason="malformed order"))
                self.load.dead_lettered += 1
            elif roll < 0.025:
                records.remove(record)
                app.send(nack([record], pb.NACK_ACTION_RETRY, retry_after_ms=500))
                self.load.retried += 1
        if records:
            app.ack(records=[ref(r) for r in records])
            self.load.acked += len(records)

    def enrich(self, app: AppStream, batch: pb.Batch) -> None:
        outputs = [
            pb.OutputRecord(topic=self.output_topic, key=r.key, value=r.value[:64])
            for r in batch.records
        ]
        app.send(pb.ConsumeRequest(ack=pb.Ack(batch_ids=[batch.batch_id], outputs=outputs)))
        self.load.with_outputs += len(batch.records)

    def release(self, app: AppStream, held: pb.Record) -> None:
        app.ack(records=[ref(held)])
        self.load.acked += 1
        self.load.hold_ended = time.time()
        log(f"app: acked {self.load.held}: the commit moves again")


@contextlib.asynccontextmanager
async def topics(kafka: LocalKafka) -> AsyncIterator[tuple[str, str, str]]:
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.plaintext)
    await admin.start()
    suffix = uuid.uuid4().hex[:6]
    names = [f"orders-{suffix}", f"orders-enriched-{suffix}", f"orders-dlq-{suffix}"]
    try:
        await admin.create_topics(
            [
                NewTopic(names[0], num_partitions=3, replication_factor=1),
                NewTopic(names[1], num_partitions=3, replication_factor=1),
                NewTopic(names[2], num_partitions=1, replication_factor=1),
            ]
        )
        yield names[0], names[1], names[2]
    finally:
        with contextlib.suppress(Exception):
            await admin.delete_topics(names)
        await admin.close()


# --- Queries --------------------------------------------------------------------------------


def all_panels(board: dict[str, Any]) -> Iterator[Panel]:
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])


def rate_interval(step_s: int) -> int:
    """Grafana's $__rate_interval: max($__interval + scrape interval, 4 x scrape interval),
    here at least 5 s so one late scrape does not make a rate spike."""
    return max(step_s + SCRAPE_INTERVAL_S, 4 * SCRAPE_INTERVAL_S, 5)


def regex_value(values: list[str]) -> str:
    """A multi-value variable as Grafana formats it for =~: (a|b), regex-escaped."""
    escaped = [re.sub(r"([\\.^$*+?()\[\]{}|])", r"\\\1", v) for v in values]
    return escaped[0] if len(escaped) == 1 else f"({'|'.join(escaped)})"


def substitute(expr: str, variables: dict[str, str]) -> str:
    def one(match: re.Match[str]) -> str:
        name = match[1] or match[2]
        if name not in variables:
            raise KeyError(f"${name} in {expr!r}")
        return variables[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", one, expr)


def resolve_variables(
    prom: Prometheus, board: dict[str, Any], start: float, end: float
) -> dict[str, list[str]]:
    """Each `label_values(selector, label)` variable, as Grafana resolves it: in order, each
    selector with the variables before it substituted."""
    resolved: dict[str, list[str]] = {}
    for var in board["templating"]["list"]:
        if var["type"] != "query":
            continue
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", var["query"]["query"])
        assert match, var["query"]["query"]
        selector = substitute(match[1], {k: regex_value(v) for k, v in resolved.items()})
        values = prom.api(f"label/{match[2]}/values", **{"match[]": selector}, start=start, end=end)
        if not values:
            raise RuntimeError(f"${var['name']}: no values for {selector}")
        resolved[var["name"]] = sorted(values)
    return resolved


@dataclass
class Series:
    name: str
    times: list[float]
    values: list[float]

    def points(self) -> int:
        return sum(not math.isnan(v) for v in self.values)

    def last(self) -> float:
        return next((v for v in reversed(self.values) if not math.isnan(v)), math.nan)

    def max(self) -> float:
        real = [v for v in self.values if not math.isnan(v)]
        return max(real) if real else math.nan


@dataclass
class Target:
    ref_id: str
    expr: str
    series: list[Series]


def legend(fmt: str, labels: dict[str, str], expr: str) -> str:
    if not fmt:
        return expr if not labels else "{" + ", ".join(f"{k}={v}" for k, v in labels.items()) + "}"
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m[1], ""), fmt).strip()


def query_panels(
    prom: Prometheus, board: dict[str, Any], start: float, end: float, step_s: int
) -> tuple[dict[int, list[Target]], dict[str, str]]:
    variables = {
        name: regex_value(values)
        for name, values in resolve_variables(prom, board, start, end).items()
    }
    variables.update(
        datasource="prometheus",
        __rate_interval=f"{rate_interval(step_s)}s",
        __interval=f"{step_s}s",
        __range=f"{math.ceil(end - start)}s",
    )
    results: dict[int, list[Target]] = {}
    for panel in all_panels(board):
        targets = []
        for target in panel.get("targets", []):
            expr = substitute(target["expr"], variables)
            data = prom.api("query_range", query=expr, start=start, end=end, step=step_s)
            series = []
            for item in data["result"]:
                points = {round(float(t)): float(v) for t, v in item["values"]}
                times = [float(t) for t in range(int(start), int(end) + 1, step_s)]
                series.append(
                    Series(
                        legend(target.get("legendFormat", ""), item["metric"], expr),
                        times,
                        [points.get(int(t), math.nan) for t in times],
                    )
                )
            series.sort(key=lambda s: s.name)
            targets.append(Target(target["refId"], expr, series))
        if targets:
            results[panel["id"]] = targets
    return results, variables


# --- Rendering ------------------------------------------------------------------------------


def picture_size(board: dict[str, Any]) -> tuple[int, int]:
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in board["panels"])
    return 24 * PX_PER_COLUMN, HEADER_PX + rows * PX_PER_ROW


def fmt_value(value: float, unit: str | None) -> str:
    if math.isnan(value):
        return "-"
    if unit == "percentunit":
        return f"{value * 100:.1f}%"
    if unit == "bytes":
        size = value
        for suffix in ("B", "KiB", "MiB", "GiB"):
            if abs(size) < 1024 or suffix == "GiB":
                return f"{size:.3g} {suffix}" if suffix != "B" else f"{size:.0f} B"
            size /= 1024
    if unit == "s":
        if value == 0:
            return "0 s"
        if abs(value) < 1:
            return f"{value * 1000:.3g} ms"
        if abs(value) < 120:
            return f"{value:.3g} s"
        return f"{value / 60:.3g} min"
    text = short(value)
    if unit == "rps":
        return f"{text}/s"
    if unit == "ops":
        return f"{text} ops/s"
    return text


def short(value: float) -> str:
    for div, suffix in ((1e9, " Bil"), (1e6, " Mil"), (1e3, " K")):
        if abs(value) >= div:
            return f"{value / div:.3g}{suffix}"
    if value == int(value):
        return str(int(value))
    return f"{value:.3g}"


def threshold_colour(panel: Panel, value: float) -> str:
    steps = panel["fieldConfig"]["defaults"].get("thresholds", {}).get("steps", [])
    colour = "green"
    for step in steps:
        if step["value"] is None or (not math.isnan(value) and value >= step["value"]):
            colour = step["color"]
    return NAMED_COLOURS.get(colour, colour)


class Renderer:
    def __init__(self, board: dict[str, Any], start: float, end: float) -> None:
        from matplotlib.figure import Figure

        self.board = board
        self.start, self.end = start, end
        self.width, self.height = picture_size(board)
        self.fig = Figure(figsize=(self.width / DPI, self.height / DPI), dpi=DPI)
        self.fig.patch.set_facecolor("#F4F5F5")

    # Pixel boxes (left, top, width, height) to figure fractions.
    def rect(
        self, left: float, top: float, w: float, h: float
    ) -> tuple[float, float, float, float]:
        return (
            left / self.width,
            1 - (top + h) / self.height,
            w / self.width,
            h / self.height,
        )

    def text(self, x: float, y: float, s: str, **kwargs: Any) -> None:
        self.fig.text(x / self.width, 1 - y / self.height, s, **kwargs)

    def panel_box(self, panel: Panel) -> tuple[float, float, float, float]:
        g = panel["gridPos"]
        margin = 4
        return (
            g["x"] * PX_PER_COLUMN + margin,
            HEADER_PX + g["y"] * PX_PER_ROW + margin,
            g["w"] * PX_PER_COLUMN - 2 * margin,
            g["h"] * PX_PER_ROW - 2 * margin,
        )

    def header(self, lines: list[str]) -> None:
        self.text(12, 30, self.board["title"], fontsize=20, weight="bold", va="baseline")
        for i, line in enumerate(lines):
            self.text(12, 56 + 18 * i, line, fontsize=10.5, va="baseline", color="#333333")

    def frame(self, panel: Panel, face: str = "white") -> tuple[float, float, float, float]:
        from matplotlib.patches import Rectangle

        left, top, w, h = self.panel_box(panel)
        fl, fb, fw, fh = self.rect(left, top, w, h)
        self.fig.add_artist(
            Rectangle(
                (fl, fb),
                fw,
                fh,
                transform=self.fig.transFigure,
                facecolor=face,
                edgecolor="#D8D9DA",
                linewidth=1,
                zorder=-10,  # under the panel's axes, which figure artists are drawn over
            )
        )
        self.text(left + 8, top + 17, panel["title"], fontsize=10.5, weight="bold", va="baseline")
        return left, top, w, h

    def row(self, panel: Panel) -> None:
        left, top, _w, h = self.panel_box(panel)
        self.text(left, top + h - 4, panel["title"], fontsize=13, weight="bold", color="#1F2329")

    def stat(self, panel: Panel, targets: list[Target]) -> None:
        series = [s for t in targets for s in t.series]
        value = series[0].last() if series else math.nan
        unit = panel["fieldConfig"]["defaults"].get("unit")
        colour = threshold_colour(panel, value)
        background = panel["options"].get("colorMode") == "background" and not math.isnan(value)
        left, top, w, h = self.frame(panel, face=colour if background else "white")
        ink = "white" if background else colour
        if series and panel["options"].get("graphMode") == "area":
            ax = self.fig.add_axes(self.rect(left + 1, top + h * 0.55, w - 2, h * 0.45 - 1))
            ax.fill_between(
                series[0].times,
                [0 if math.isnan(v) else v for v in series[0].values],
                color="white" if background else colour,
                alpha=0.35 if background else 0.25,
                linewidth=0,
            )
            ax.set_axis_off()
            ax.set_xlim(self.start, self.end)
            ax.set_ylim(bottom=0)
        text = "No data" if math.isnan(value) else fmt_value(value, unit)
        self.text(
            left + w / 2,
            top + h * 0.58,
            text,
            fontsize=26 if not math.isnan(value) else 14,
            weight="bold",
            color=ink if not math.isnan(value) else "#8E8E8E",
            ha="center",
            va="center",
        )
        if background:  # the title, again, readable on the colour
            self.text(
                left + 8,
                top + 17,
                panel["title"],
                fontsize=10.5,
                weight="bold",
                color="white",
                va="baseline",
            )

    def no_data(self, left: float, top: float, w: float, h: float) -> None:
        self.text(
            left + w / 2,
            top + h / 2,
            "No data",
            fontsize=14,
            color="#8E8E8E",
            ha="center",
            va="center",
        )

    def time_axis(self, ax: Any) -> None:
        from matplotlib.ticker import FixedLocator, FuncFormatter

        # Clock times (UTC) on round seconds, 4 to 8 of them, as Grafana's time axis.
        span = self.end - self.start
        every = next((s for s in TICK_STEPS if span / s <= 8), TICK_STEPS[-1])
        first = math.ceil(self.start / every) * every
        ax.set_xlim(self.start, self.end)
        ax.xaxis.set_major_locator(FixedLocator(list(range(int(first), int(self.end) + 1, every))))
        ax.xaxis.set_major_formatter(
            FuncFormatter(lambda x, _pos: time.strftime("%H:%M:%S", time.gmtime(x)))
        )
        ax.tick_params(labelsize=8, colors="#555555", length=2)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
        for side in ("left", "bottom"):
            ax.spines[side].set_color("#C7C7C7")
        ax.grid(True, color="#EBEBEB", linewidth=0.8)

    def shade_hold(self, ax: Any, hold: tuple[float, float] | None) -> None:
        if hold is None:
            return
        ax.axvspan(
            hold[0],
            hold[1],
            color=HOLD_SHADE,
            alpha=0.08,
            linewidth=0,
        )

    def timeseries(
        self, panel: Panel, targets: list[Target], hold: tuple[float, float] | None
    ) -> None:
        from matplotlib.ticker import FuncFormatter, MaxNLocator

        left, top, w, h = self.frame(panel)
        series = [s for t in targets for s in t.series]
        defaults = panel["fieldConfig"]["defaults"]
        unit = defaults.get("unit")
        custom = defaults.get("custom", {})
        # The legend table (name, Last *, Max) lists series that moved first: a panel's lines
        # that stayed at 0 (causes that did not happen) are the ones a full legend drops.
        colours = {id(s): PALETTE[i % len(PALETTE)] for i, s in enumerate(series)}
        ranked = [s for s in series if s.max() > 0] + [s for s in series if not s.max() > 0]
        shown, hidden = ranked[:LEGEND_ROWS], ranked[LEGEND_ROWS:]
        legend_h = 16 + 14 * (len(shown) + bool(hidden)) if series else 0
        plot_top = top + 28
        plot_h = h - 28 - legend_h - 22
        ax = self.fig.add_axes(self.rect(left + 66, plot_top, w - 66 - 14, plot_h))
        self.time_axis(ax)
        self.shade_hold(ax, hold)
        if not series:
            ax.set_yticks([])
            self.no_data(left, top, w, h)
            return
        fill = custom.get("fillOpacity", 0) / 100
        for s in series:
            times = s.times
            ax.plot(times, s.values, color=colours[id(s)], linewidth=1.3)
            if fill:
                ax.fill_between(times, s.values, color=colours[id(s)], alpha=fill, linewidth=0)
        real = [v for s in series for v in s.values if not math.isnan(v)]
        low, high = (min(real), max(real)) if real else (0.0, 1.0)
        soft_min = custom.get("axisSoftMin")
        if soft_min is not None:
            low = min(low, soft_min)
        if high <= low:
            high = low + 1
        ax.set_ylim(low, high + (high - low) * 0.08)
        ax.yaxis.set_major_locator(MaxNLocator(nbins=4))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: fmt_value(v, unit)))
        y = top + h - legend_h + 4
        last_x, max_x = left + w - 110, left + w - 14
        grey = {"fontsize": 8, "color": "#555555", "va": "top"}
        self.text(last_x, y, "Last *", ha="right", **grey)
        self.text(max_x, y, "Max", ha="right", **grey)
        for i, s in enumerate(shown):
            yy = y + 14 * (i + 1)
            self.text(
                left + 10, yy, "\u2014", fontsize=10, color=colours[id(s)], weight="bold", va="top"
            )
            name = s.name if len(s.name) <= 70 else s.name[:67] + "..."
            self.text(left + 28, yy, name, fontsize=8, va="top")
            self.text(last_x, yy, fmt_value(s.last(), unit), fontsize=8, ha="right", va="top")
            self.text(max_x, yy, fmt_value(s.max(), unit), fontsize=8, ha="right", va="top")
        if hidden:
            zero = all(not s.max() > 0 for s in hidden)
            more = f"+ {len(hidden)} more series" + (", all 0" if zero else "")
            self.text(left + 28, y + 14 * (len(shown) + 1), more, **grey)

    def state_timeline(
        self, panel: Panel, targets: list[Target], hold: tuple[float, float] | None
    ) -> None:
        left, top, w, h = self.frame(panel)
        series = [s for t in targets for s in t.series]
        mappings: dict[str, dict[str, Any]] = {}
        for mapping in panel["fieldConfig"]["defaults"].get("mappings", []):
            if mapping["type"] == "value":
                mappings.update(mapping["options"])
        label_w = min(260.0, w * 0.38)
        ax = self.fig.add_axes(self.rect(left + label_w, top + 28, w - label_w - 14, h - 28 - 44))
        self.time_axis(ax)
        ax.grid(False)
        if not series:
            ax.set_yticks([])
            self.no_data(left, top, w, h)
            return
        row_height = panel["options"].get("rowHeight", 0.9)
        for row, s in enumerate(series):
            y = len(series) - 1 - row
            run_start: float | None = None
            run_value = math.nan
            for t, v in [*zip(s.times, s.values, strict=True), (s.times[-1] + 1, math.nan)]:
                same = (math.isnan(v) and math.isnan(run_value)) or v == run_value
                if same:
                    continue
                if run_start is not None and not math.isnan(run_value):
                    key = str(int(run_value)) if run_value == int(run_value) else str(run_value)
                    colour = mappings.get(key, {}).get("color") or threshold_colour(
                        panel, run_value
                    )
                    x0 = run_start
                    x1 = min(t, s.times[-1])
                    ax.broken_barh(
                        [(x0, x1 - x0)],
                        (y - row_height / 2, row_height),
                        facecolors=NAMED_COLOURS.get(colour, colour),
                        alpha=0.85,
                    )
                    text = mappings.get(key, {}).get("text", key)
                    if x1 - x0 > 0.06 * (ax.get_xlim()[1] - ax.get_xlim()[0]):
                        ax.text(
                            x0 + (x1 - x0) / 2,
                            y,
                            text,
                            ha="center",
                            va="center",
                            fontsize=8,
                            color="white",
                            weight="bold",
                        )
                run_start, run_value = t, v
        ax.set_ylim(-0.6, len(series) - 0.4)
        ax.set_yticks(range(len(series)))
        ax.set_yticklabels([s.name for s in reversed(series)], fontsize=8)
        ax.spines["left"].set_visible(False)
        ax.tick_params(axis="y", length=0)
        del hold  # the timeline shows the stall itself

    def draw(self, results: dict[int, list[Target]], hold: tuple[float, float] | None) -> None:
        for panel in all_panels(self.board):
            targets = results.get(panel["id"], [])
            kind = panel["type"]
            if kind == "row":
                self.row(panel)
            elif kind == "stat":
                self.stat(panel, targets)
            elif kind == "timeseries":
                self.timeseries(panel, targets, hold)
            elif kind == "state-timeline":
                self.state_timeline(panel, targets, hold)
            else:
                raise ValueError(f"panel {panel['id']}: type {kind} is not drawn")

    def save(self, out: Path) -> None:
        """The PNG, in 256 colours: a third of the size, and no difference to see (the
        picture has a few flat colours and anti-aliased edges)."""
        from PIL import Image

        buffer = io.BytesIO()
        self.fig.savefig(buffer, dpi=DPI, format="png")
        out.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(buffer) as image:
            image.convert("RGB").quantize(colors=256).save(out, format="PNG", optimize=True)


# --- The run --------------------------------------------------------------------------------


@dataclass
class Run:
    start: float
    end: float
    hold: tuple[float, float] | None
    load: Load
    sidecar_log: str
    variables: dict[str, str]
    results: dict[int, list[Target]]


async def run(args: argparse.Namespace, prometheus_binary: str) -> Run:
    log("kafka: scripts/local-kafka start (kept running)")
    kafka = await asyncio.to_thread(LocalKafka.ensure_started)
    folder = Path(tempfile.mkdtemp(prefix="ks-picture-", dir="/tmp"))
    load = Load()
    try:
        async with topics(kafka) as (topic, output_topic, dlq):
            metrics = f"127.0.0.1:{free_port()}"
            prom = Prometheus(prometheus_binary, metrics, folder)
            prom.start()
            common: dict[str, Any] = {
                "batch": {"max_records": 100, "max_wait_ms": 250},
                "window": {"max_outstanding_records": 100, "max_outstanding_batches": 4},
                "stall_after_ms": args.stall_after_ms,
                "ack_deadline_ms": max(60000, args.seconds * 1000),
                "commit_interval_ms": 500,
            }
            orders = group_subscription(
                ORDERS,
                topic,
                dead_letter={"topic": dlq},
                retry={"max_attempts": 3, "initial_backoff_ms": 500, "max_backoff_ms": 2000},
                **common,
            )
            enrich = group_subscription(
                ENRICH,
                topic,
                transactions={"enabled": True, "transactional_id_prefix": "picture"},
                **common,
            )
            sidecar = SidecarProcess(
                kafka,
                [orders, enrich],
                listener="iam",
                metrics=metrics,
                extra={"log": {"level": "INFO"}},
            )
            try:
                await prom.wait_ready()
                log(f"prometheus: ready on {prom.address}, scraping {metrics} every 1 s")
                sidecar.start()
                await sidecar.wait_serving()
                log(f"sidecar: serving {ORDERS} and {ENRICH} (topic {topic}, 3 partitions)")
                start = math.floor(time.time()) - 5
                began = time.monotonic()
                until = began + args.seconds
                hold = (began + HOLD_FROM * args.seconds, began + HOLD_UNTIL * args.seconds)
                log(
                    f"load: {args.rate} records/s for {args.seconds} s; one record held from "
                    f"{HOLD_FROM * args.seconds:.0f} s to {HOLD_UNTIL * args.seconds:.0f} s "
                    f"(stall_after_ms {args.stall_after_ms})"
                )
                app = App(output_topic, hold, load)
                stop = asyncio.Event()
                async with grpc.aio.insecure_channel(sidecar.address) as channel:
                    streams = [
                        asyncio.create_task(app.stream(channel, name, stop))
                        for name in (ORDERS, ORDERS, ENRICH)
                    ]
                    driving = asyncio.gather(
                        produce(kafka, topic, args.rate, until, load), progress(load, began, until)
                    )
                    tasks: list[asyncio.Future[Any]] = [driving, *streams]
                    done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                    if driving not in done:  # a stream ended before the load did
                        for task in done:
                            task.result()
                        raise RuntimeError("an app stream ended early")
                    driving.result()
                    # The picture ends with the load; the app goes on acking (its streams stay
                    # attached) while the last scrapes come in and the queries run.
                    end = math.floor(time.time())
                    await asyncio.sleep(3)
                    log("prometheus: querying every panel target")
                    board = json.loads(DASHBOARD.read_text())
                    results, variables = await asyncio.to_thread(
                        query_panels, prom, board, start, end, args.step
                    )
                    stop.set()  # the streams stay attached until the queries are done
                    await asyncio.gather(*streams)
                if not load.held:
                    load.errors.append("no record of partition 0 arrived during the hold")
                shade = (load.hold_started, load.hold_ended) if load.hold_ended else None
                return Run(start, end, shade, load, sidecar.logs(), variables, results)
            finally:
                sidecar.stop()
                prom.stop()
                shutil.rmtree(sidecar.dir, ignore_errors=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


async def progress(load: Load, began: float, until: float) -> None:
    while time.monotonic() < until:
        await asyncio.sleep(min(15, max(until - time.monotonic(), 0.1)))
        holding = f", holding {load.held}" if load.held and not load.hold_ended else ""
        log(
            f"load: {time.monotonic() - began:.0f} s, produced {load.produced}, "
            f"{ORDERS} acked {load.acked}, retried {load.retried}, "
            f"dead-lettered {load.dead_lettered}; {ENRICH} acked {load.with_outputs} with "
            f"outputs{holding}"
        )


def summary(
    board: dict[str, Any], result: Run, out: Path, seconds: int, step: int
) -> dict[str, Any]:
    panels = []
    for panel in all_panels(board):
        if panel["type"] == "row":
            continue
        targets = result.results.get(panel["id"], [])
        panels.append(
            {
                "id": panel["id"],
                "title": panel["title"],
                "type": panel["type"],
                "targets": [
                    {
                        "refId": t.ref_id,
                        "series": [
                            {
                                "name": s.name,
                                "points": s.points(),
                                "last": s.last(),
                                "max": s.max(),
                                # One per `step` s from `start`; null: no point there.
                                "values": [None if math.isnan(v) else v for v in s.values],
                            }
                            for s in t.series
                        ],
                    }
                    for t in targets
                ],
                "points": sum(s.points() for t in targets for s in t.series),
            }
        )
    width, height = picture_size(board)
    stalled_logs = [
        line for line in result.sidecar_log.splitlines() if '"partition stalled' in line
    ]
    return {
        "out": str(out),
        "bytes": out.stat().st_size,
        "width": width,
        "height": height,
        "seconds": seconds,
        "start": result.start,
        "step": step,
        "end": result.end,
        "hold": list(result.hold) if result.hold else None,
        "held": result.load.held,
        "produced": result.load.produced,
        "acked": result.load.acked,
        "with_outputs": result.load.with_outputs,
        "retried": result.load.retried,
        "dead_lettered": result.load.dead_lettered,
        "stall_logged": [json.loads(line).get("msg", "") for line in stalled_logs],
        "variables": result.variables,
        "errors": result.load.errors,
        "panels": panels,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/dashboard-picture",
        description=(
            "Runs a real sidecar under load (with a deliberate stall in the middle) against the "
            "local broker, scraped by a real Prometheus, and draws every panel of the Grafana "
            "dashboard from Prometheus's answers into one PNG."
        ),
        epilog="The whole story is this module's docstring (bench/dashboard_picture.py).",
    )
    parser.add_argument("--seconds", type=int, default=200, help="load duration (default 200)")
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help=f"PNG (default {DEFAULT_OUT.relative_to(ROOT)})",
    )
    parser.add_argument(
        "--rate", type=int, default=150, help="records produced per second (default 150)"
    )
    parser.add_argument(
        "--stall-after-ms",
        type=int,
        default=5000,
        help="the subscriptions' stall_after_ms (default 5000)",
    )
    parser.add_argument(
        "--step", type=int, default=1, help="query_range step in seconds (default 1)"
    )
    parser.add_argument(
        "--prometheus", help="a prometheus binary (default: scripts/ensure-prometheus)"
    )
    parser.add_argument("--report", type=Path, help="also write the summary here, as JSON")
    args = parser.parse_args(argv)
    if args.seconds < 30:
        parser.error("--seconds: at least 30 (the stall needs room)")
    if (HOLD_UNTIL - HOLD_FROM) * args.seconds * 1000 < args.stall_after_ms + 3000:
        parser.error("--seconds: too short for the hold to outlast --stall-after-ms")

    binary = args.prometheus or ensure_prometheus()
    os.environ.setdefault("MPLBACKEND", "Agg")
    result = asyncio.run(run(args, binary))
    board = json.loads(DASHBOARD.read_text())
    log(f"render: {len(result.results)} panels with targets into {args.out}")
    renderer = Renderer(board, result.start, result.end)
    renderer.header(header_lines(args, result))
    renderer.draw(result.results, result.hold)
    renderer.save(args.out)
    report = summary(board, result, args.out, args.seconds, args.step)
    if args.report:
        args.report.write_text(json.dumps(report, indent=1))
    print_summary(report)
    return 1 if result.load.errors else 0


def header_lines(args: argparse.Namespace, result: Run) -> list[str]:
    def clock(t: float) -> str:
        return time.strftime("%H:%M:%S", time.gmtime(t))

    day = time.strftime("%Y-%m-%d", time.gmtime(result.start))
    lines = [
        f"A real run, {day} {clock(result.start)}-{clock(result.end)} UTC: one sidecar "
        f"(namespace {NAMESPACE}, pod {POD}) with subscriptions {ORDERS} and {ENRICH} of one "
        f"3-partition topic, scraped by Prometheus every {SCRAPE_INTERVAL_S} s; "
        f"\\$__rate_interval = {result.variables['__rate_interval']}.",
        f"Load: {args.rate} records/s. {ORDERS}: two app streams ack each batch, 2% nacked for a "
        f"retry, 0.5% dead-lettered. {ENRICH}: one stream acks each batch with an output per "
        f"record, in transactions.",
    ]
    if result.hold:
        lines.append(
            f"Shaded {clock(result.hold[0])}-{clock(result.hold[1])}: the {ORDERS} app holds "
            f"{result.load.held} unacked, then acks it; stall_after_ms is "
            f"{args.stall_after_ms}. Before and after: healthy."
        )
    return lines


def print_summary(report: dict[str, Any]) -> None:
    print(f"{report['out']}: {report['width']}x{report['height']} px, {report['bytes']} bytes")
    print(
        f"load: {report['seconds']} s, produced {report['produced']}; {ORDERS}: acked "
        f"{report['acked']}, retried {report['retried']}, dead-lettered "
        f"{report['dead_lettered']}; {ENRICH}: acked {report['with_outputs']} with outputs"
    )
    print(
        f"stall: held {report['held'] or 'nothing'}; "
        f"sidecar logged {len(report['stall_logged'])} stall warning(s)"
    )
    print(f"{'panel':<52} {'series':>6} {'points':>7}")
    for panel in report["panels"]:
        series = sum(len(t["series"]) for t in panel["targets"])
        print(f"{panel['title'][:52]:<52} {series:>6} {panel['points']:>7}")
    empty = [p["title"] for p in report["panels"] if not p["points"]]
    print(f"panels without data: {', '.join(empty) if empty else 'none'}")
    for error in report["errors"]:
        print(f"error: {error}")


if __name__ == "__main__":
    sys.exit(main())
