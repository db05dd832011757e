"""The chart's alert rules (charts/kafka-sidecar/templates/prometheusrule.yaml), run by promtool.

The PrometheusRule is rendered with helm (enabled, the chart's defaults, release `orders` in
namespace `shop` with the ServiceMonitor on), its spec.groups written to a rules file, and
Prometheus's own promtool checks it (`promtool check rules`) and runs the unit tests of
tests/alerts/kafka-sidecar-tests.yaml on it (`promtool test rules`): for every alert, series that
make it fire (labels and annotations checked) and series that must not. An alert without such
tests fails here, and so does one without its runbook paragraph in docs/operations.md, which is
the rules' only other description: the docs show no copy of them. helm and promtool are built
from their Go modules by scripts/ensure-helm and scripts/ensure-promtool (the first run on a
machine takes minutes; a missing `go` fails these tests); after that these tests take seconds.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.clienttools import ensure_tool
from tests.test_chart import PROMETHEUS_RULE_SCHEMA

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "kafka-sidecar"
UNIT_TESTS = ROOT / "tests" / "alerts" / "kafka-sidecar-tests.yaml"
OPERATIONS_MD = ROOT / "docs" / "operations.md"
#: The rules file the unit tests name in rule_files (written beside a copy of them).
RULES_FILE = "kafka-sidecar-rules.yaml"

#: What the unit tests are written for: the chart's defaults with the rules and the
#: ServiceMonitor on, so the rules select the series that ServiceMonitor's job scrapes.
ENABLED = ("prometheusRule.enabled=true", "serviceMonitor.enabled=true")
SELECTOR = 'namespace="shop", job="orders-kafka-sidecar-metrics"'
RUNBOOKS = "https://github.com/kafka-sidecar/kafka-sidecar/blob/main/docs/operations.md"
#: Series the rules may use that the sidecar does not export: Prometheus's own and
#: kube-state-metrics'.
OTHER_METRICS = {
    "up",
    "kube_pod_container_status_restarts_total",
    "kube_pod_init_container_status_restarts_total",
    "kube_pod_container_resource_limits",
    "kube_pod_init_container_resource_limits",
}

# The first test to need helm or promtool may build it: minutes, not seconds.
pytestmark = pytest.mark.timeout(1200)

Manifest = dict[str, Any]


@pytest.fixture(scope="session")
def promtool() -> str:
    return ensure_tool("ensure-promtool")


@dataclass(frozen=True)
class Helm:
    """`helm template orders <chart> --namespace shop`, with its own config folders."""

    binary: str
    env: dict[str, str]

    def template(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.binary, "template", "orders", str(CHART), "--namespace", "shop", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )


@pytest.fixture(scope="module")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    home = tmp_path_factory.mktemp("helm-home")
    env = {
        **os.environ,
        **{f"HELM_{d.upper()}_HOME": str(home / d) for d in ("config", "cache", "data")},
    }
    return Helm(ensure_tool("ensure-helm"), env)


def render_rule(helm: Helm, *args: str) -> Manifest | None:
    """The PrometheusRule rendered with `--set`/`--set-json` arguments, or None."""
    proc = helm.template(*args)
    assert proc.returncode == 0, proc.stderr
    rules = [m for m in yaml.safe_load_all(proc.stdout) if m and m["kind"] == "PrometheusRule"]
    assert len(rules) <= 1
    return rules[0] if rules else None


def sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def alerts(rule: Manifest) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for group in rule["spec"]["groups"]:
        for r in group["rules"]:
            assert r["alert"] not in found, f"two rules named {r['alert']}"
            found[r["alert"]] = r
    return found


@pytest.fixture(scope="module")
def rule(helm: Helm) -> Manifest:
    rendered = render_rule(helm, *sets(*ENABLED))
    assert rendered is not None
    return rendered


@pytest.fixture(scope="module")
def rules_dir(rule: Manifest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The rendered rules as a Prometheus rules file, beside a copy of the unit tests."""
    folder = tmp_path_factory.mktemp("alerts")
    (folder / RULES_FILE).write_text(
        yaml.safe_dump({"groups": rule["spec"]["groups"]}, sort_keys=False), encoding="utf-8"
    )
    shutil.copy(UNIT_TESTS, folder / UNIT_TESTS.name)
    return folder


def run_promtool(promtool: str, folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool, *args], cwd=folder, capture_output=True, text=True, timeout=120, check=False
    )


# --- promtool ---------------------------------------------------------------------------------


def test_promtool_checks_the_rules(promtool: str, rules_dir: Path, rule: Manifest) -> None:
    proc = run_promtool(promtool, rules_dir, "check", "rules", RULES_FILE)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(alerts(rule))} rules found" in proc.stdout, proc.stdout


def test_promtool_unit_tests_pass(promtool: str, rules_dir: Path) -> None:
    proc = run_promtool(promtool, rules_dir, "test", "rules", UNIT_TESTS.name)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout, proc.stdout


def test_every_alert_has_unit_tests_that_fire_and_that_do_not(rule: Manifest) -> None:
    """Each alert: a case where it fires (labels and every annotation given, so promtool
    compares them) and one where nothing fires; no case for an alert the chart lacks."""
    tests = yaml.safe_load(UNIT_TESTS.read_text(encoding="utf-8"))
    assert tests["rule_files"] == [RULES_FILE]
    fires: set[str] = set()
    silent: set[str] = set()
    for group in tests["tests"]:
        for case in group.get("alert_rule_test", []):
            name = case["alertname"]
            expected = case.get("exp_alerts") or []
            if not expected:
                silent.add(name)
            for alert in expected:
                assert alert["exp_labels"].get("severity"), name
                assert set(alert["exp_annotations"]) == {"summary", "description", "runbook_url"}
                fires.add(name)
    names = set(alerts(rule))
    assert not names - fires, f"alerts never made to fire in {UNIT_TESTS.name}: {names - fires}"
    assert not names - silent, f"alerts never shown silent in {UNIT_TESTS.name}: {names - silent}"
    assert not (fires | silent) - names, f"tests of unknown alerts: {(fires | silent) - names}"


# --- the rules themselves ---------------------------------------------------------------------


def github_anchor(heading: str) -> str:
    """The id GitHub gives a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def alerts_section() -> str:
    docs = OPERATIONS_MD.read_text(encoding="utf-8")
    start = docs.index("\n### Alerts\n")
    end = docs.find("\n## ", start)
    return docs[start : end if end >= 0 else len(docs)]


def test_every_alert_links_its_runbook_in_operations_md(rule: Manifest) -> None:
    section = alerts_section()
    headings = re.findall(r"^#### (.+)$", section, flags=re.MULTILINE)
    anchors = {github_anchor(h): h for h in headings}
    for name, r in alerts(rule).items():
        annotations = r["annotations"]
        assert annotations["summary"], name
        assert annotations["description"], name
        assert annotations["runbook_url"] == f"{RUNBOOKS}#{github_anchor(name)}", name
        assert github_anchor(name) in anchors, f"no runbook heading '#### {name}' under ### Alerts"
    documented = {h for h in headings if h.startswith("KafkaSidecar")}
    assert documented == set(alerts(rule)), "runbooks and alerts differ"


def test_the_defaults_table_in_operations_md_is_the_charts(rule: Manifest) -> None:
    """The table of alerts says each one's default severity, `for` and threshold: those of the
    chart (its values.yaml, as rendered), and every values key is an alert of that name."""
    values = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    defaults: dict[str, dict[str, Any]] = values["prometheusRule"]["alerts"]
    rules = alerts(rule)
    by_name = {f"KafkaSidecar{key[0].upper()}{key[1:]}": d for key, d in defaults.items()}
    assert set(by_name) == set(rules), "prometheusRule.alerts keys and the alerts differ"
    rows = re.findall(
        r"^\| \[(KafkaSidecar\w+)\]\(#(\w+)\) \| (\S+) \| (\S+) \| (\S+) \|",
        alerts_section(),
        flags=re.MULTILINE,
    )
    assert [row[0] for row in rows] == list(rules), (
        "the table lists other alerts, or in another order"
    )
    for name, anchor, severity, for_, threshold in rows:
        assert anchor == github_anchor(name), name
        assert severity == rules[name]["labels"]["severity"], name
        assert for_ == rules[name]["for"], name
        assert threshold == str(by_name[name].get("threshold", "—")), name


def test_rules_use_only_metrics_that_exist(rule: Manifest) -> None:
    """Every kafka_sidecar_* and process_* series named is one docs/operations.md lists as
    exported (tests/test_chart.py checks that list against a running sidecar's /metrics)."""
    docs = OPERATIONS_MD.read_text(encoding="utf-8")
    exported = docs[docs.index("### What it exports") : docs.index("### Alerts")]
    for name, r in alerts(rule).items():
        metrics = set(re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{", r["expr"]))
        assert metrics, name
        for metric in metrics - OTHER_METRICS:
            assert f"`{metric}`" in exported, f"{name}: {metric} is not exported"
        # Each of this release's series, and only those (the restart count comes from
        # kube-state-metrics: its pods are matched against this release's `up`).
        for selector in re.findall(r"\b(?:kafka_sidecar_\w+|process_\w+|up)\{([^}]*)\}", r["expr"]):
            assert selector.endswith(SELECTOR), f"{name}: {selector}"


def test_rule_object_is_what_the_operator_takes(rule: Manifest) -> None:
    jsonschema.validate(rule, PROMETHEUS_RULE_SCHEMA)
    assert rule["metadata"]["name"] == "orders-kafka-sidecar"


# --- values -----------------------------------------------------------------------------------


def test_off_by_default(helm: Helm) -> None:
    assert render_rule(helm) is None
    assert render_rule(helm, *sets("serviceMonitor.enabled=true")) is None


def test_thresholds_durations_and_severities_come_from_values(helm: Helm) -> None:
    rendered = render_rule(
        helm,
        *sets(
            *ENABLED,
            "prometheusRule.labels.release=prometheus",
            "prometheusRule.alertLabels.team=orders",
            "prometheusRule.runbookBaseUrl=https://wiki.example.com/kafka-sidecar",
            "prometheusRule.alerts.consumerLagGrowing.threshold=2000000",
            "prometheusRule.alerts.consumerLagGrowing.for=1h",
            "prometheusRule.alerts.consumerLagGrowing.severity=critical",
            "prometheusRule.alerts.restarting.window=1h",
            "prometheusRule.alerts.windowFull.enabled=false",
        ),
        "--set-json",
        "prometheusRule.alerts.memoryHigh.threshold=0.9",
    )
    assert rendered is not None
    assert rendered["metadata"]["labels"]["release"] == "prometheus"
    found = alerts(rendered)
    assert "KafkaSidecarWindowFull" not in found
    lag = found["KafkaSidecarConsumerLagGrowing"]
    assert ") > 2000000\n" in lag["expr"]  # as written, not 2e+06
    assert lag["for"] == "1h"
    assert lag["labels"] == {"severity": "critical", "team": "orders"}
    assert "above 2000000 and still growing for 1h" in lag["annotations"]["description"]
    assert lag["annotations"]["runbook_url"] == (
        "https://wiki.example.com/kafka-sidecar#kafkasidecarconsumerlaggrowing"
    )
    restarts = found["KafkaSidecarRestarting"]["expr"]
    assert restarts.count('{container="kafka-sidecar"}[1h])') == 2  # native and classic
    assert ") > 2\n" in restarts
    assert found["KafkaSidecarMemoryHigh"]["expr"].endswith("> 0.9")


def test_alert_labels_cannot_override_severity(helm: Helm) -> None:
    rendered = render_rule(helm, *sets(*ENABLED, "prometheusRule.alertLabels.severity=info"))
    assert rendered is not None
    for name, r in alerts(rendered).items():
        assert r["labels"]["severity"] in ("warning", "critical"), name


def test_no_streams_waits_for_the_longest_detach_timeout(helm: Helm) -> None:
    def no_streams_for(*extra: str) -> str:
        rendered = render_rule(helm, *sets(*ENABLED, *extra))
        assert rendered is not None
        value: str = alerts(rendered)["KafkaSidecarNoStreams"]["for"]
        return value

    assert no_streams_for() == "120s"  # detach_timeout_ms' default, 60 s, + 60 s
    subs = "sidecar.config.subscriptions"
    assert (
        no_streams_for(
            f"{subs}[0].name=a",
            f"{subs}[0].topics={{a}}",
            f"{subs}[0].detach_timeout_ms=90500",
            f"{subs}[1].name=b",
            f"{subs}[1].topics={{b}}",
            f"{subs}[1].detach_timeout_ms=0",
            "prometheusRule.alerts.noStreams.marginSeconds=30",
        )
        == "121s"
    )
    assert no_streams_for("prometheusRule.alerts.noStreams.for=10m") == "10m"
    rendered = render_rule(
        helm, *sets(*ENABLED, "prometheusRule.alerts.noStreams.excludeSubscriptions={brands,geo}")
    )
    assert rendered is not None
    assert alerts(rendered)["KafkaSidecarNoStreams"]["expr"] == (
        f'kafka_sidecar_streams{{subscription!~"brands|geo", {SELECTOR}}} == 0'
    )
    # A timeout from the environment: the chart cannot know it.
    proc = helm.template(
        *sets(
            *ENABLED,
            f"{subs}[0].name=a",
            f"{subs}[0].topics={{a}}",
            f"{subs}[0].detach_timeout_ms=${{DETACH_MS}}",
        )
    )
    assert proc.returncode != 0
    assert "prometheusRule.alerts.noStreams.for: set it" in proc.stderr


def test_selector_picks_the_release_series(helm: Helm) -> None:
    # Without the chart's ServiceMonitor nothing says which series are this release's.
    proc = helm.template(*sets("prometheusRule.enabled=true"))
    assert proc.returncode != 0
    assert "prometheusRule.selector: set it" in proc.stderr
    rendered = render_rule(
        helm, *sets("prometheusRule.enabled=true", 'prometheusRule.selector=job="orders"')
    )
    assert rendered is not None
    serving = alerts(rendered)["KafkaSidecarSubscriptionNotServing"]
    assert serving["expr"] == 'kafka_sidecar_subscription_serving{job="orders"} == 0'


def test_values_schema_checks_the_alerts(helm: Helm) -> None:
    for bad, where in [
        ("prometheusRule.alerts.partitionStalled.for=5 minutes", "partitionStalled/for"),
        ("prometheusRule.alerts.noSuchAlert.enabled=true", "alerts"),
        ("prometheusRule.alerts.commitsFailing.threshold=many", "commitsFailing/threshold"),
        ("prometheusRule.runbookBaseUrl=docs/operations.md", "runbookBaseUrl"),
    ]:
        proc = helm.template(*sets(*ENABLED, bad))
        assert proc.returncode != 0, bad
        assert where in proc.stderr, (bad, proc.stderr)
