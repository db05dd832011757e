"""The Grafana dashboard (charts/kafka-sidecar/dashboards/kafka-sidecar.json) and its ConfigMap.

The JSON is checked for what Grafana needs to load it (uid, title, schemaVersion, the template
variables, panels with ids, types, grid positions that do not overlap, and targets with refIds
and expressions); every PromQL expression, with the dashboard's variables replaced by
placeholders, goes through Prometheus's own parser (`promtool check rules`, each expression a
recording rule); every metric it names is one docs/operations.md lists as exported and one a
real sidecar serves on /metrics (with a dead-letter topic and output transactions, so those
families have samples). The chart renders the dashboard as a ConfigMap for Grafana's dashboard
sidecar only when `grafanaDashboard.enabled`. promtool and helm come from
scripts/ensure-promtool and scripts/ensure-helm (tests/test_alerts.py, tests/test_chart.py).
"""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from itertools import combinations
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from aiokafka import AIOKafkaProducer
from prometheus_client.parser import text_string_to_metric_families

from kafkasidecar.v1 import consumer_pb2 as pb
from tests import test_alerts, test_chart
from tests.localkafka import LocalKafka
from tests.sidecarproc import AppStream, SidecarProcess, group_subscription, ref
from tests.test_delivery import produce, wait_committed
from tests.test_failures import nack
from tests.test_metrics import scrape
from tests.test_server import free_port

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "charts" / "kafka-sidecar" / "dashboards" / "kafka-sidecar.json"
OPERATIONS_MD = ROOT / "docs" / "operations.md"

# helm (tests/test_chart.py) and promtool (tests/test_alerts.py) may be built on first use.
pytestmark = pytest.mark.timeout(1200)

# The fixtures, reused rather than copied.
helm = test_chart.helm
promtool = test_alerts.promtool

TopicFactory = Callable[..., Awaitable[str]]
StartSidecar = Callable[..., Awaitable[SidecarProcess]]
Panel = dict[str, Any]

VARIABLES = ("datasource", "namespace", "pod", "subscription")
#: What Grafana's own variables stand for in PromQL (durations) when an expression is parsed.
BUILTIN_DURATIONS = ("__rate_interval", "__interval", "__range")
#: Families the dashboard may name that have no sample until something fails: declared
#: (`# TYPE`) on /metrics from the start, with a sample per cause once a DLQ write fails.
DECLARED_ONLY = {"kafka_sidecar_dead_letter_failures_total"}
#: PromQL's keywords and modifiers: identifiers that are no metric.
KEYWORDS = {"and", "or", "unless", "bool", "offset"}
#: Panel types of a current Grafana's core that the dashboard uses.
PANEL_TYPES = {"row", "stat", "timeseries", "state-timeline"}
#: The series without a subscription label (docs/operations.md: "Per sidecar").
PER_SIDECAR = {
    "kafka_sidecar_broker_reconnects_total",
    "kafka_sidecar_token_refreshes_total",
    "kafka_sidecar_auth_failures_total",
    "kafka_sidecar_token_expiry_timestamp_seconds",
}


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return loaded


def all_panels(board: dict[str, Any]) -> Iterator[Panel]:
    """Every panel, those inside (collapsed) rows included."""
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])


def expressions(board: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target."""
    return [
        (f"panel {panel['id']} ({panel['title']}) {target['refId']}", target["expr"])
        for panel in all_panels(board)
        for target in panel.get("targets", [])
    ]


def variable_selectors(board: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(variable, series selector, label) of each `label_values(selector, label)` variable."""
    found = []
    for var in board["templating"]["list"]:
        if var["type"] != "query":
            continue
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", var["query"]["query"])
        assert match, f"${var['name']}: not label_values(selector, label)"
        assert var["definition"] == var["query"]["query"], var["name"]
        found.append((var["name"], match[1], match[2]))
    return found


def placeholders(expr: str) -> str:
    """The expression as Prometheus would get it: Grafana's variables filled in."""
    for name in BUILTIN_DURATIONS:
        expr = expr.replace(f"${{{name}}}", "5m").replace(f"${name}", "5m")
    expr = re.sub(r"\$\{?(\w+)\}?", "placeholder", expr)
    assert "$" not in expr, expr
    return expr


def metric_names(expr: str) -> set[str]:
    """The series an expression names: what is left once strings, label matchers, ranges,
    grouping clauses, functions and keywords are taken out."""
    rest = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    rest = re.sub(r"\{[^}]*\}", " ", rest)
    rest = re.sub(r"\[[^\]]*\]", " ", rest)
    rest = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", rest)
    names = set()
    for match in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", rest):
        if match[2] is None and match[1] not in KEYWORDS:
            names.add(match[1])
    return names


def used_metrics(board: dict[str, Any]) -> dict[str, set[str]]:
    """metric -> where the dashboard uses it (panels and variables)."""
    used: dict[str, set[str]] = {}
    for where, expr in expressions(board):
        for name in metric_names(expr):
            used.setdefault(name, set()).add(where)
    for var, selector, _ in variable_selectors(board):
        for name in metric_names(selector):
            used.setdefault(name, set()).add(f"${var}")
    return used


# --- (a) what Grafana needs ---------------------------------------------------------------


def test_the_dashboard_has_what_grafana_requires() -> None:
    board = dashboard()
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,40}", board["uid"]), board["uid"]
    assert board["title"]
    # Grafana 12's classic JSON model (datasource references as objects, no Angular panels);
    # later versions migrate it on load.
    assert isinstance(board["schemaVersion"], int)
    assert board["schemaVersion"] >= 41
    assert board["time"] == {"from": "now-3h", "to": "now"}
    assert board["refresh"]
    assert "id" not in board or board["id"] is None, "an id ties the JSON to one Grafana"

    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert tuple(variables) == VARIABLES
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in VARIABLES[1:]:
        var = variables[name]
        assert var["type"] == "query"
        assert var["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert var["multi"], name
        assert var["includeAll"], name
        assert var["allValue"] == ".*", name
    assert [label for _, _, label in variable_selectors(board)] == list(VARIABLES[1:])


def test_panels_have_ids_types_grid_positions_and_targets() -> None:
    board = dashboard()
    panels = list(all_panels(board))
    ids = [p["id"] for p in panels]
    assert all(isinstance(i, int) and i > 0 for i in ids)
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in panels:
        where = f"panel {panel['id']}"
        assert panel["type"] in PANEL_TYPES, where
        assert panel["title"], where
        grid = panel["gridPos"]
        assert set(grid) == {"x", "y", "w", "h"}, where
        assert all(isinstance(v, int) for v in grid.values()), where
        assert min(grid["x"], grid["y"]) >= 0, where
        assert min(grid["w"], grid["h"]) > 0, where
        assert grid["x"] + grid["w"] <= 24, f"{where} is wider than the grid"
        if panel["type"] == "row":
            assert "targets" not in panel, where
            assert (grid["w"], grid["h"]) == (24, 1), where
            continue
        assert panel["description"], f"{where}: say what it shows"
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where
        targets = panel["targets"]
        assert targets, f"{where} has no targets"
        refs = [t["refId"] for t in targets]
        assert len(refs) == len(set(refs)), f"{where}: refIds repeat"
        for target in targets:
            assert target["refId"], where
            assert target["expr"].strip(), where
            assert target["datasource"] == panel["datasource"], where


def test_no_two_panels_overlap() -> None:
    boxes = [(p["id"], p["gridPos"]) for p in dashboard()["panels"]]
    for (a, ga), (b, gb) in combinations(boxes, 2):
        apart = (
            ga["x"] + ga["w"] <= gb["x"]
            or gb["x"] + gb["w"] <= ga["x"]
            or ga["y"] + ga["h"] <= gb["y"]
            or gb["y"] + gb["h"] <= ga["y"]
        )
        assert apart, f"panels {a} and {b} overlap: {ga} {gb}"


def test_panels_name_only_series_of_the_chosen_sidecars() -> None:
    """Every selector of the sidecar's series carries the namespace and pod variables, those
    of per-subscription series the subscription variable too; process_* series (which the app
    may export as well) are those of scrape targets that serve the chosen sidecars' series."""
    for where, expr in expressions(dashboard()):
        for metric, matchers in re.findall(r"\b(kafka_sidecar_\w+)(\{[^}]*\})?", expr):
            assert 'namespace=~"$namespace"' in matchers, f"{where}: {metric}"
            assert 'pod=~"$pod"' in matchers, f"{where}: {metric}"
            if metric not in PER_SIDECAR:
                assert 'subscription=~"$subscription"' in matchers, f"{where}: {metric}"
        if re.search(r"\bprocess_\w+", expr):
            assert re.search(r"\band on \(job, instance\) kafka_sidecar_\w+\{", expr), where


# --- (b) every expression parses ----------------------------------------------------------


def test_every_expression_parses_with_promtool(promtool: str, tmp_path: Path) -> None:
    board = dashboard()
    rules = [
        {"record": f"dashboard:expr_{i}", "expr": placeholders(expr)}
        for i, (_, expr) in enumerate(expressions(board))
    ]
    rules += [
        {"record": f"dashboard:variable_{name}", "expr": placeholders(selector)}
        for name, selector, _ in variable_selectors(board)
    ]
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, sort_keys=False),
        encoding="utf-8",
    )
    proc = test_alerts.run_promtool(promtool, tmp_path, "check", "rules", path.name)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(rules)} rules found" in proc.stdout, proc.stdout


def test_promtool_catches_a_broken_expression(promtool: str, tmp_path: Path) -> None:
    """The check above would fail on a typo (it is no rubber stamp)."""
    broken = "sum by (subscription) (rate(kafka_sidecar_acks_total[5m])"
    path = tmp_path / "broken.yaml"
    path.write_text(
        yaml.safe_dump({"groups": [{"name": "x", "rules": [{"record": "x:y", "expr": broken}]}]}),
        encoding="utf-8",
    )
    proc = test_alerts.run_promtool(promtool, tmp_path, "check", "rules", path.name)
    assert proc.returncode != 0, proc.stdout


# --- (c) every metric exists --------------------------------------------------------------


def test_metric_names_are_read_from_expressions() -> None:
    expr = (
        'time() - max by (subscription, pod) (max_over_time(timestamp(changes(x_total{a="b"}'
        '[2m]) > 0)[1h:1m])) / on (job) y and on (job, instance) z{k=~"$v"} offset 5m'
    )
    assert metric_names(expr) == {"x_total", "y", "z"}


def test_the_dashboard_uses_only_metrics_operations_md_lists() -> None:
    docs = OPERATIONS_MD.read_text(encoding="utf-8")
    exported = docs[docs.index("### What it exports") : docs.index("### Dashboard")]
    used = used_metrics(dashboard())
    assert "kafka_sidecar_consumer_lag" in used
    for name, where in sorted(used.items()):
        assert name.startswith(("kafka_sidecar_", "process_")), f"{name} ({where})"
        # A summary is listed by its name; its samples add _count and _sum.
        base = re.sub(r"_(count|sum)$", "", name)
        listed = f"`{name}`" in exported or f"| `{base}` | summary" in exported
        assert listed, f"{name} ({sorted(where)}) is not exported"


async def exposition(address: str) -> str:
    def fetch() -> str:
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
            return str(response.read().decode())

    return await asyncio.to_thread(fetch)


async def test_every_metric_exists_in_a_running_sidecars_metrics(
    kafka: LocalKafka,
    new_topic: TopicFactory,
    producer: AIOKafkaProducer,
    start_sidecar: StartSidecar,
) -> None:
    """A sidecar over MSK IAM auth, with a dead-letter topic and output transactions, after a
    dead letter, a retry and acks with outputs: the dashboard's series are on its /metrics."""
    topic, out, dlq = await new_topic(partitions=2), await new_topic(), await new_topic()
    await produce(producer, topic, 30, partitions=2)
    address = f"127.0.0.1:{free_port()}"
    sub = group_subscription(
        "dash",
        topic,
        dead_letter={"topic": dlq},
        transactions={"enabled": True, "transactional_id_prefix": "dash-test"},
        batch={"max_records": 10},
    )
    sidecar = await start_sidecar([sub], listener="iam", metrics=address)

    def output(record: pb.Record) -> pb.OutputRecord:
        return pb.OutputRecord(topic=out, key=record.key, value=record.value)

    async with grpc.aio.insecure_channel(sidecar.address) as channel:
        app = AppStream(channel)
        await app.open("dash")
        first = (await app.next("batch")).batch
        app.send(nack([first.records[0]], pb.NACK_ACTION_DEAD_LETTER, reason="bad"))
        app.send(nack([first.records[1]], retry_after_ms=10))
        rest = first.records[2:]
        app.send(
            pb.ConsumeRequest(
                ack=pb.Ack(records=[ref(r) for r in rest], outputs=[output(r) for r in rest])
            )
        )
        while True:
            try:
                batch = (await app.next("batch", timeout=5)).batch
            except TimeoutError:
                break
            app.send(
                pb.ConsumeRequest(
                    ack=pb.Ack(
                        batch_ids=[batch.batch_id], outputs=[output(r) for r in batch.records]
                    )
                )
            )
        await wait_committed(kafka, sub["group_id"], topic)
        samples = await scrape(address)
        text = await exposition(address)
        app.close()

    s = (("subscription", "dash"),)
    assert samples[("kafka_sidecar_dead_lettered_total", s)] == 1
    assert samples[("kafka_sidecar_transactions_total", (("outcome", "committed"), *s))] >= 1

    with_samples: dict[str, list[dict[str, str]]] = {}
    for name, labels in samples:
        with_samples.setdefault(name, []).append(dict(labels))
    declared = {
        f"{family.name}_total" if family.type == "counter" else family.name
        for family in text_string_to_metric_families(text)
    }
    board = dashboard()
    for name, places in sorted(used_metrics(board).items()):
        if name in DECLARED_ONLY:
            assert name in declared, f"{name} ({sorted(places)}) is not on /metrics"
        else:
            assert name in with_samples, f"{name} ({sorted(places)}) has no sample on /metrics"

    # The fixed label values the panels select (kind="records", result="ok") exist.
    for where, expr in expressions(board):
        for metric, matchers in re.findall(r"\b(kafka_sidecar_\w+)\{([^}]*)\}", expr):
            for label, value in re.findall(r'(\w+)="([^"$]*)"', matchers):
                values = {labels.get(label) for labels in with_samples.get(metric, [])}
                if metric not in DECLARED_ONLY:
                    assert value in values, f"{where}: {metric}{{{label}={value!r}}}: {values}"
    # The subscription variable reads its values from the sidecar's own label (namespace and
    # pod are added by the scrape).
    assert {"subscription": "dash"} in with_samples["kafka_sidecar_subscription_serving"]


# --- (d) the chart's ConfigMap ------------------------------------------------------------


def dashboard_configmaps(manifests: list[test_chart.Manifest]) -> list[test_chart.Manifest]:
    return [
        m
        for m in manifests
        if m["kind"] == "ConfigMap" and m["metadata"]["name"].endswith("-dashboard")
    ]


def test_off_by_default(helm: str) -> None:
    manifests = test_chart.render(helm)
    assert not dashboard_configmaps(manifests)
    assert not dashboard_configmaps(test_chart.render(helm, "irsa-monitoring"))


def test_enabled_renders_the_dashboard_for_grafanas_sidecar(helm: str) -> None:
    manifests = test_chart.render(helm, None, "grafanaDashboard.enabled=true")
    (cm,) = dashboard_configmaps(manifests)
    test_chart.validate(cm, test_chart.LATEST)
    meta = cm["metadata"]
    assert meta["name"] == "orders-kafka-sidecar-dashboard"
    assert meta["namespace"] == "shop"
    assert meta["labels"]["grafana_dashboard"] == "1"
    assert meta["labels"]["app.kubernetes.io/instance"] == "orders"
    assert "annotations" not in meta
    assert list(cm["data"]) == ["kafka-sidecar.json"]
    assert json.loads(cm["data"]["kafka-sidecar.json"]) == dashboard()
    # The sidecar's own ConfigMap is still there, unchanged in name.
    names = {m["metadata"]["name"] for m in manifests if m["kind"] == "ConfigMap"}
    assert {"orders-kafka-sidecar-config", "orders-kafka-sidecar-dashboard"} <= names


def test_label_folder_annotations_and_namespace_come_from_values(helm: str) -> None:
    manifests = test_chart.render(
        helm,
        None,
        "grafanaDashboard.enabled=true",
        "grafanaDashboard.labelKey=dashboards",
        "grafanaDashboard.labelValue=kafka",
        "grafanaDashboard.labels.team=orders",
        "grafanaDashboard.annotations.owner=orders-team",
        "grafanaDashboard.folder=Kafka",
        "grafanaDashboard.namespace=monitoring",
    )
    (cm,) = dashboard_configmaps(manifests)
    test_chart.validate(cm, test_chart.LATEST)
    meta = cm["metadata"]
    assert meta["namespace"] == "monitoring"
    assert meta["labels"]["dashboards"] == "kafka"
    assert "grafana_dashboard" not in meta["labels"]
    assert meta["labels"]["team"] == "orders"
    assert meta["annotations"] == {"owner": "orders-team", "k8s-sidecar-target-directory": "Kafka"}

    other = test_chart.render(
        helm,
        None,
        "grafanaDashboard.enabled=true",
        "grafanaDashboard.folder=Kafka",
        "grafanaDashboard.folderAnnotation=grafana_folder",
    )
    (cm,) = dashboard_configmaps(other)
    assert cm["metadata"]["annotations"] == {"grafana_folder": "Kafka"}


def test_values_schema_checks_the_dashboard_values(helm: str) -> None:
    for bad in (
        "grafanaDashboard.enabled=yes",
        "grafanaDashboard.labelKey=",
        "grafanaDashboard.unknown=1",
    ):
        error = test_chart.render_error(helm, None, bad)
        assert "grafanaDashboard" in error, (bad, error)
