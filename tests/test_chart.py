"""The Helm chart (charts/kafka-sidecar): lint, render, validate, and what it promises.

Every values file under charts/kafka-sidecar/ci is linted and rendered, and every manifest is
validated offline against the Kubernetes JSON schemas of kubernetes-validate (strict: unknown
fields are errors) for the oldest and newest versions each sidecar mode supports. The sidecar
config the chart renders into its ConfigMap goes through the real `kafka-sidecar
check-config`, and once through `kafka-sidecar run`: the rendered listeners are probed as
kubelet, the app and Prometheus would reach them. helm is built from its Go module by
scripts/ensure-helm (the first run on a machine takes a few minutes; a missing `go` fails
these tests).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import grpc
import jsonschema
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kafkasidecar.v1 import consumer_pb2 as pb
from kafkasidecar.v1 import consumer_pb2_grpc as pb_grpc
from tests.clienttools import ensure_tool

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "kafka-sidecar"
CI_VALUES = CHART / "ci"
OPERATIONS_MD = ROOT / "docs" / "operations.md"

# The first test to need helm may build it (scripts/ensure-helm): minutes, not seconds.
pytestmark = pytest.mark.timeout(1200)

#: name -> values file (None: the chart's defaults alone).
VALUES: dict[str, Path | None] = {
    "default": None,
    "classic-sidecar": CI_VALUES / "classic-sidecar-values.yaml",
    "irsa-monitoring": CI_VALUES / "irsa-monitoring-values.yaml",
    "subscriptions": CI_VALUES / "subscriptions-values.yaml",
}
#: What `${VAR}` in the rendered sidecar configs refers to (the pod sets these).
POD_ENV = {"POD_NAME": "orders-7d9f8-abcde", "POD_NAMESPACE": "default", "ENV": "staging"}
POD_ENV_SECRETS = {"SCRAM_PASSWORD": "not-a-real-password"}

Manifest = dict[str, Any]


# --- helm ----------------------------------------------------------------------------------


#: helm's config, cache and data folders, kept out of the user's home.
HELM_ENV: dict[str, str] = {}


@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory) -> str:
    binary = ensure_tool("ensure-helm")
    home = tmp_path_factory.mktemp("helm-home")
    HELM_ENV.update(
        HELM_CONFIG_HOME=str(home / "config"),
        HELM_CACHE_HOME=str(home / "cache"),
        HELM_DATA_HOME=str(home / "data"),
    )
    return binary


def run_helm(helm: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [helm, *args],
        env={**os.environ, **HELM_ENV},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def template_args(values: str | None, sets: tuple[str, ...], kube: str | None) -> list[str]:
    """`values`: a name from VALUES, or the path of another values file."""
    args = ["template", "orders", str(CHART), "--namespace", "shop"]
    if values is not None:
        path = VALUES[values] if values in VALUES else Path(values)
        if path is not None:
            args += ["-f", str(path)]
    for item in sets:
        args += ["--set", item]
    if kube is not None:
        args += ["--kube-version", kube]
    return args


@cache
def _render(helm: str, values: str | None, sets: tuple[str, ...], kube: str | None) -> str:
    proc = run_helm(helm, *template_args(values, sets, kube))
    if proc.returncode != 0:
        raise AssertionError(f"helm template failed:\n{proc.stderr}")
    return proc.stdout


def render(
    helm: str, values: str | None = None, *sets: str, kube: str | None = None
) -> list[Manifest]:
    return [doc for doc in yaml.safe_load_all(_render(helm, values, sets, kube)) if doc]


def render_error(helm: str, values: str | None = None, *sets: str, kube: str | None = None) -> str:
    proc = run_helm(helm, *template_args(values, sets, kube))
    assert proc.returncode != 0, "helm template should have failed"
    return proc.stderr


def one(manifests: list[Manifest], kind: str) -> Manifest:
    found = [m for m in manifests if m["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {[m['kind'] for m in manifests]}"
    return found[0]


def pod_spec(manifests: list[Manifest]) -> dict[str, Any]:
    spec: dict[str, Any] = one(manifests, "Deployment")["spec"]["template"]["spec"]
    return spec


def sidecar_container(spec: dict[str, Any]) -> dict[str, Any]:
    found = [
        c
        for c in spec.get("initContainers", []) + spec["containers"]
        if c["name"] == "kafka-sidecar"
    ]
    assert len(found) == 1
    container: dict[str, Any] = found[0]
    return container


PROBES = ("startupProbe", "readinessProbe", "livenessProbe")


def kafka_sidecar_script() -> str:
    script = shutil.which("kafka-sidecar", path=str(Path(sys.executable).parent))
    assert script is not None, "kafka-sidecar console script not installed (pip install -e .)"
    return script


def clean_env() -> dict[str, str]:
    """The pod's environment, with nothing of the developer's Kafka or AWS setup."""
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("KAFKA_SIDECAR_", "AWS_")) and k != "KAFKA_CA_FILE"
    }
    return {**clean, **POD_ENV, **POD_ENV_SECRETS}


# --- validation ----------------------------------------------------------------------------

#: The ServiceMonitor fields the chart renders (prometheus-operator's monitoring.coreos.com/v1
#: CRD); kubernetes-validate knows only Kubernetes' own kinds.
SERVICE_MONITOR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "endpoints"],
            "properties": {
                "selector": {
                    "type": "object",
                    "properties": {
                        "matchLabels": {
                            "type": "object",
                            "additionalProperties": {"type": "string"},
                        }
                    },
                },
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "any": {"type": "boolean"},
                        "matchNames": {"type": "array", "items": {"type": "string"}},
                    },
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                            "scrapeTimeout": {
                                "type": "string",
                                "pattern": "^[0-9]+(ms|s|m|h)$",
                            },
                        },
                    },
                },
            },
        },
    },
}

_STRING_MAP: dict[str, Any] = {"type": "object", "additionalProperties": {"type": "string"}}
#: Prometheus's duration format, as prometheus-operator's CRD checks `for`.
_DURATION = "^(0|([0-9]+y)?([0-9]+w)?([0-9]+d)?([0-9]+h)?([0-9]+m)?([0-9]+s)?([0-9]+ms)?)$"

#: The PrometheusRule fields the chart renders (prometheus-operator's monitoring.coreos.com/v1
#: CRD). tests/test_alerts.py runs the rules themselves through promtool.
PROMETHEUS_RULE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PrometheusRule"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {"labels": _STRING_MAP},
        },
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["groups"],
            "properties": {
                "groups": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["name", "rules"],
                        "properties": {
                            "name": {"type": "string", "minLength": 1},
                            "interval": {"type": "string", "pattern": _DURATION},
                            "rules": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "required": ["alert", "expr"],
                                    "properties": {
                                        "alert": {"type": "string", "minLength": 1},
                                        "expr": {"type": "string", "minLength": 1},
                                        "for": {"type": "string", "pattern": _DURATION},
                                        "labels": _STRING_MAP,
                                        "annotations": _STRING_MAP,
                                    },
                                },
                            },
                        },
                    },
                }
            },
        },
    },
}

#: Oldest and newest Kubernetes each mode supports (native sidecars: 1.29+).
LATEST = str(kubernetes_validate.latest_version())
NATIVE_VERSIONS = ("1.29.0", LATEST)
CLASSIC_VERSIONS = ("1.25.0", "1.28.0", LATEST)


def validate(manifest: Manifest, version: str) -> None:
    if manifest["kind"] == "ServiceMonitor":
        jsonschema.validate(manifest, SERVICE_MONITOR_SCHEMA)
        return
    if manifest["kind"] == "PrometheusRule":
        jsonschema.validate(manifest, PROMETHEUS_RULE_SCHEMA)
        return
    try:
        kubernetes_validate.validate(manifest, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        name = f"{manifest['kind']}/{manifest['metadata']['name']}"
        pytest.fail(f"{name} is not valid Kubernetes {version}: {exc.message} at {exc.path}")


# --- lint, render, validate --------------------------------------------------------------


@pytest.mark.parametrize("values", list(VALUES))
def test_chart_lints(helm: str, values: str) -> None:
    args = ["lint", "--strict", str(CHART)]
    if VALUES[values] is not None:
        args += ["-f", str(VALUES[values])]
    proc = run_helm(helm, *args)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    # helm lint reports a template's `fail` as [INFO] and passes: a values file that cannot
    # render must still fail here.
    assert "Fail:" not in output, output
    assert "[ERROR]" not in output, output
    assert "[WARNING]" not in output, output


@pytest.mark.parametrize("values", list(VALUES))
def test_rendered_manifests_are_valid_kubernetes(helm: str, values: str) -> None:
    manifests = render(helm, values)
    kinds = sorted(m["kind"] for m in manifests)
    assert {"ConfigMap", "Deployment", "ServiceAccount", "PodDisruptionBudget"} <= set(kinds)
    native = "initContainers" in pod_spec(manifests)
    versions = NATIVE_VERSIONS if native else CLASSIC_VERSIONS
    for version in versions:
        rendered = render(helm, values, kube=version)
        for manifest in rendered:
            validate(manifest, version)


def test_strict_validation_catches_a_native_sidecar_on_old_kubernetes(helm: str) -> None:
    # The validation above would notice: 1.25's schema has no container restartPolicy.
    deployment = one(render(helm, "default"), "Deployment")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, "1.25.0", strict=True)


@pytest.mark.parametrize("values", list(VALUES))
def test_rendered_sidecar_config_passes_check_config(
    helm: str, values: str, tmp_path: Path
) -> None:
    manifests = render(helm, values)
    configmap = one(manifests, "ConfigMap")
    config_file = tmp_path / "config.yaml"
    config_file.write_text(configmap["data"]["config.yaml"], encoding="utf-8")

    proc = subprocess.run(
        [kafka_sidecar_script(), "check-config", str(config_file)],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    effective = yaml.safe_load(proc.stdout)

    # The chart's listeners, as its probes, ports and app env expect them. The consumer API
    # stays inside the pod: the socket (for the pod's shared group) and loopback, nothing else.
    spec = pod_spec(manifests)
    sidecar = sidecar_container(spec)
    listen = effective["listen"]
    app_env = {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}
    assert listen["grpc"] == [app_env["KAFKA_SIDECAR_TARGET"], app_env["KAFKA_SIDECAR_TCP_TARGET"]]
    assert listen["grpc"][0] == "unix:///var/run/kafka-sidecar/sidecar.sock"
    assert listen["grpc"][1].startswith("127.0.0.1:")
    assert listen["unix_socket_mode"] == 0o660
    assert listen["unix_socket_group"] == spec["securityContext"]["fsGroup"]
    # Only health and metrics listen on the pod IP, and they are the container's ports.
    ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    assert set(ports) == {"sidecar-health", "sidecar-metrics"}
    host, _, port = listen["health"].rpartition(":")
    assert host in {"0.0.0.0", "[::]"}
    assert int(port) == ports["sidecar-health"]
    assert listen["metrics"] == f"0.0.0.0:{ports['sidecar-metrics']}"
    assert int(listen["grpc"][1].rpartition(":")[2]) not in ports.values()
    # kubelet's probes go to the health-only listener.
    for probe in PROBES:
        assert sidecar[probe]["grpc"]["port"] == ports["sidecar-health"], probe
    assert effective["kafka"]["client_id"] in {POD_ENV["POD_NAME"], "kafka-sidecar"}
    # Secrets stay secret: env references in the ConfigMap, masked by check-config.
    assert POD_ENV_SECRETS["SCRAM_PASSWORD"] not in configmap["data"]["config.yaml"]
    assert POD_ENV_SECRETS["SCRAM_PASSWORD"] not in proc.stdout


# --- what the chart promises ---------------------------------------------------------------


def test_native_sidecar_is_a_restartable_init_container(helm: str) -> None:
    manifests = render(helm, "default")
    spec = pod_spec(manifests)
    assert [c["name"] for c in spec["initContainers"]] == ["kafka-sidecar"]
    assert [c["name"] for c in spec["containers"]] == ["app"]
    sidecar = spec["initContainers"][0]
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["args"] == ["run", "--config", "/etc/kafka-sidecar/config.yaml"]

    # gRPC probes on the health-only port (the pod IP, where kubelet dials); startup gates
    # the app's start.
    for probe in PROBES:
        assert sidecar[probe]["grpc"] == {"port": 50052}, probe
    assert [(p["name"], p["containerPort"]) for p in sidecar["ports"]] == [
        ("sidecar-health", 50052),
        ("sidecar-metrics", 9464),
    ]

    # The config is mounted where the image looks for it; the socket folder is shared.
    mounts = {m["name"]: m for m in sidecar["volumeMounts"]}
    assert mounts["kafka-sidecar-config"]["mountPath"] == "/etc/kafka-sidecar"
    assert mounts["kafka-sidecar-config"]["readOnly"] is True
    assert mounts["kafka-sidecar-socket"]["mountPath"] == "/var/run/kafka-sidecar"
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert "emptyDir" in volumes["kafka-sidecar-socket"]
    assert (
        volumes["kafka-sidecar-config"]["configMap"]["name"]
        == one(manifests, "ConfigMap")["metadata"]["name"]
    )

    app = spec["containers"][0]
    assert {"name": "kafka-sidecar-socket", "mountPath": "/var/run/kafka-sidecar"} in app[
        "volumeMounts"
    ]
    env = {e["name"]: e.get("value") for e in app["env"]}
    assert env["KAFKA_SIDECAR_TARGET"] == "unix:///var/run/kafka-sidecar/sidecar.sock"
    assert env["KAFKA_SIDECAR_TCP_TARGET"] == "127.0.0.1:50051"

    # A config change rolls the pods.
    annotations = one(manifests, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    changed = render(helm, "default", "sidecar.config.log.level=DEBUG")
    changed_annotations = one(changed, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert (
        annotations["checksum/kafka-sidecar-config"]
        != changed_annotations["checksum/kafka-sidecar-config"]
    )


def test_classic_sidecar_is_a_second_container(helm: str) -> None:
    spec = pod_spec(render(helm, "classic-sidecar", kube="1.28.0"))
    assert "initContainers" not in spec
    assert [c["name"] for c in spec["containers"]] == ["app", "kafka-sidecar"]
    assert "restartPolicy" not in spec["containers"][1]


def test_native_sidecar_needs_kubernetes_1_29(helm: str) -> None:
    error = render_error(helm, "default", kube="1.28.0")
    assert "sidecar.native=false" in error


@pytest.mark.parametrize(
    ("sets", "expected"),
    [
        # native: app drain (default: the sidecar's grace) + sidecar grace + margin
        ((), 30 + 30 + 15),
        (("sidecar.config.shutdown_grace_ms=60001",), 61 + 61 + 15),
        (("sidecar.config.shutdown_grace_ms=10000", "app.drainSeconds=45"), 45 + 10 + 15),
        (("sidecar.config.shutdown_grace_ms=0", "app.drainSeconds=0"), 15),
        (("terminationGraceMarginSeconds=5",), 30 + 30 + 5),
        # classic: both stop at once: max(app drain, sidecar grace) + margin
        (("sidecar.native=false",), 30 + 15),
        (("sidecar.native=false", "app.drainSeconds=90"), 90 + 15),
        (("sidecar.native=false", "sidecar.config.shutdown_grace_ms=45500"), 46 + 15),
        # explicit
        (("terminationGracePeriodSeconds=300",), 300),
    ],
)
def test_termination_grace_is_derived_from_the_shutdown_grace(
    helm: str, sets: tuple[str, ...], expected: int
) -> None:
    spec = pod_spec(render(helm, None, *sets))
    assert spec["terminationGracePeriodSeconds"] == expected


def test_termination_grace_shorter_than_the_shutdown_grace_is_refused(helm: str) -> None:
    error = render_error(helm, None, "terminationGracePeriodSeconds=20")
    assert "shorter than the sidecar's shutdown grace" in error


def test_irsa_service_monitor_pdb_and_token(helm: str) -> None:
    manifests = render(helm, "irsa-monitoring")
    account = one(manifests, "ServiceAccount")
    assert (
        account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
        == "arn:aws:iam::123456789012:role/orders-consumer"
    )
    spec = pod_spec(manifests)
    assert spec["serviceAccountName"] == account["metadata"]["name"]

    # The ServiceMonitor finds the metrics Service, whose port reaches the sidecar's.
    service = one(manifests, "Service")
    monitor = one(manifests, "ServiceMonitor")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    assert service["spec"]["ports"][0]["targetPort"] == "sidecar-metrics"
    pod_labels = one(manifests, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()

    pdb = one(manifests, "PodDisruptionBudget")
    assert pdb["spec"] == {
        "minAvailable": 2,
        "selector": {"matchLabels": service["spec"]["selector"]},
    }

    # The bearer token reaches both containers from the Secret, never the ConfigMap.
    sidecar = sidecar_container(spec)
    app = spec["containers"][0]
    token_ref = {"secretKeyRef": {"name": "orders-consumer-sidecar-token", "key": "token"}}
    assert {"name": "KAFKA_SIDECAR_LISTEN__AUTH_TOKEN", "valueFrom": token_ref} in sidecar["env"]
    assert {"name": "KAFKA_SIDECAR_TOKEN", "valueFrom": token_ref} in app["env"]

    # Other pods reach the app's port, the health port and (from monitoring) the metrics port.
    policy = one(manifests, "NetworkPolicy")
    rules = {rule["ports"][0]["port"]: rule.get("from") for rule in policy["spec"]["ingress"]}
    assert rules == {
        8080: None,
        50052: None,
        9464: [
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
        ],
    }


@pytest.mark.parametrize("values", list(VALUES))
def test_network_policy_admits_health_and_metrics_never_the_consumer_api(
    helm: str, values: str
) -> None:
    manifests = render(helm, values)
    policy = one(manifests, "NetworkPolicy")
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    allowed = [p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]]
    spec = pod_spec(manifests)
    sidecar_ports = [p["containerPort"] for p in sidecar_container(spec)["ports"]]
    app_ports = [p["containerPort"] for p in spec["containers"][0].get("ports", [])]
    assert allowed == app_ports + sidecar_ports  # health, metrics
    assert 50051 not in allowed

    if values == "default":
        no_metrics = render(helm, values, "sidecar.metrics.enabled=false")
        policy = one(no_metrics, "NetworkPolicy")
        assert [rule["ports"] for rule in policy["spec"]["ingress"]] == [
            [{"port": 50052, "protocol": "TCP"}]
        ]


def test_every_container_is_locked_down(helm: str) -> None:
    for values in VALUES:
        spec = pod_spec(render(helm, values))
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True
        # No user forced on the pod: the app's is its own. It reaches the socket through the
        # pod's fsGroup, the image's group.
        assert "runAsUser" not in pod
        assert pod["fsGroup"] == 10001
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in spec.get("initContainers", []) + spec["containers"]:
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, container["name"]
            assert context["allowPrivilegeEscalation"] is False, container["name"]
            assert context["capabilities"] == {"drop": ["ALL"]}, container["name"]
            assert "resources" in container, container["name"]
        sidecar = sidecar_container(spec)
        assert sidecar["resources"]["limits"]["memory"]
        assert sidecar["securityContext"]["runAsNonRoot"] is True
    # An app with a user of its own keeps it.
    app = pod_spec(render(helm, "subscriptions"))["containers"][0]
    assert app["securityContext"]["runAsUser"] == 1000


def test_values_schema_rejects_mistakes(helm: str) -> None:
    assert "additional properties 'replicas' not allowed" in render_error(helm, None, "replicas=3")
    assert "/sidecar/config/listen" in render_error(
        helm, None, "sidecar.config.listen.grpc=127.0.0.1:1"
    )
    assert "/serviceAccount/roleArn" in render_error(helm, None, "serviceAccount.roleArn=orders")
    # The consumer API cannot be put on the pod IP; the health port cannot leave it.
    assert "additional properties 'host' not allowed" in render_error(
        helm, None, "sidecar.grpc.host=0.0.0.0"
    )
    assert "/sidecar/health/host" in render_error(helm, None, "sidecar.health.host=127.0.0.1")
    assert "additional properties 'mode' not allowed" in render_error(
        helm, None, "sidecar.probes.mode=exec"
    )


def test_listener_ports_must_differ(helm: str) -> None:
    for sets in (("sidecar.health.port=50051",), ("sidecar.metrics.port=50052",)):
        assert "must differ" in render_error(helm, None, *sets)
    # Without the metrics endpoint its port is free for the others.
    render(helm, None, "sidecar.metrics.enabled=false", "sidecar.health.port=9464")


def rendered_listen(manifests: list[Manifest]) -> dict[str, Any]:
    config = yaml.safe_load(one(manifests, "ConfigMap")["data"]["config.yaml"])
    listen: dict[str, Any] = config["listen"]
    return listen


@pytest.mark.parametrize(
    ("sets", "group", "mode"),
    [
        pytest.param((), 10001, "0660", id="default-fsgroup"),
        pytest.param(("podSecurityContext.fsGroup=3000",), 3000, "0660", id="own-fsgroup"),
        pytest.param(
            ("sidecar.socketGroup=4000", "podSecurityContext.supplementalGroups={4000}"),
            4000,
            "0660",
            id="supplemental-group",
        ),
        # Both containers run as group 5000: the socket is created with it.
        pytest.param(
            ("podSecurityContext.fsGroup=null", "podSecurityContext.runAsGroup=5000"),
            None,
            "0660",
            id="shared-run-as-group",
        ),
        pytest.param(
            ("podSecurityContext.fsGroup=null", "sidecar.socketMode=0666"),
            None,
            "0666",
            id="any-user",
        ),
    ],
)
def test_socket_is_for_a_group_the_pod_gives_the_app(
    helm: str, sets: tuple[str, ...], group: int | None, mode: str
) -> None:
    manifests = render(helm, None, *sets)
    listen = rendered_listen(manifests)
    assert listen["unix_socket_mode"] == mode
    assert listen.get("unix_socket_group") == group
    pod = pod_spec(manifests)["securityContext"]
    if group is not None:
        assert group in [pod.get("fsGroup"), *pod.get("supplementalGroups", [])]


@pytest.mark.parametrize(
    ("sets", "group"),
    [
        (("podSecurityContext.fsGroup=null",), "none set"),
        (("sidecar.socketGroup=3000",), "gid 3000"),
        (
            (
                "podSecurityContext.fsGroup=null",
                "podSecurityContext.runAsGroup=3000",
                "app.securityContext.runAsGroup=4000",
            ),
            "gid 3000",
        ),
    ],
)
def test_a_socket_the_app_could_not_open_is_refused(
    helm: str, sets: tuple[str, ...], group: str
) -> None:
    error = render_error(helm, None, *sets)
    assert (
        "sidecar.socketMode 0660 admits only the socket's owner and group, but the pod does not"
        f" give the app that group ({group})"
    ) in error
    # A parent chart's pod is its own business: the ConfigMap alone still renders.
    render(helm, None, "deployment.enabled=false", *sets)


@pytest.mark.parametrize("mode", ["0600", "0640", "0644"])
def test_a_socket_mode_without_write_for_the_app_is_refused(helm: str, mode: str) -> None:
    assert f"sidecar.socketMode {mode} admits the sidecar's user alone" in render_error(
        helm, None, f"sidecar.socketMode={mode}"
    )


def test_values_schema_checks_the_socket(helm: str) -> None:
    assert "/sidecar/socketMode" in render_error(helm, None, "sidecar.socketMode=rw-rw----")
    assert "/sidecar/socketMode" in render_error(helm, None, "sidecar.socketMode=660")
    assert "/sidecar/socketGroup" in render_error(helm, None, "sidecar.socketGroup=-1")
    assert "/sidecar/socketGroup" in render_error(helm, None, "sidecar.socketGroup=staff")


def test_probes_can_check_one_subscription_on_ipv6(helm: str) -> None:
    manifests = render(helm, "subscriptions")
    sidecar = sidecar_container(pod_spec(manifests))
    for probe in PROBES:
        assert sidecar[probe]["grpc"] == {"port": 50052, "service": "receipts"}, probe
    config = yaml.safe_load(one(manifests, "ConfigMap")["data"]["config.yaml"])
    assert config["listen"]["health"] == "[::]:50052"


# --- the rendered config, run ---------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def outside_address() -> str:
    """An address of this machine other than loopback: where kubelet or Prometheus, from
    outside the pod, would connect (127.0.0.1 if the machine has no other)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("198.51.100.1", 9))  # no packet is sent: this only picks a route
            address = str(s.getsockname()[0])
        except OSError:
            return "127.0.0.1"
    return "127.0.0.1" if address.startswith("127.") else address


@dataclass(frozen=True)
class RunningSidecar:
    socket: Path
    socket_group: int
    api_port: int
    health_port: int
    metrics_port: int
    container: dict[str, Any]
    token: str


@pytest.fixture(scope="module")
def running_sidecar(
    helm: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningSidecar]:
    """`kafka-sidecar run` with the config the chart renders (no Kafka: it never joins)."""
    work = tmp_path_factory.mktemp("run")
    api_port, health_port, metrics_port, no_kafka = (free_port() for _ in range(4))
    # The pod's fsGroup is one of the sidecar's groups: root may take the chart's default
    # (10001); any other user, its own group.
    fs_group = 10001 if os.geteuid() == 0 else os.getegid()
    values = {
        "podSecurityContext": {"fsGroup": fs_group},
        "sidecar": {
            "socketDir": str(work / "sock"),
            "grpc": {"port": api_port},
            "health": {"port": health_port},
            "metrics": {"port": metrics_port},
            "config": {
                "kafka": {
                    "bootstrap_servers": [f"127.0.0.1:{no_kafka}"],
                    "security_protocol": "PLAINTEXT",
                    "sasl_mechanism": None,
                    "aws": None,
                },
                "subscriptions": [{"name": "orders", "topics": ["orders"], "group_id": "o"}],
            },
        },
    }
    values_file = work / "values.yaml"
    values_file.write_text(yaml.safe_dump(values), encoding="utf-8")
    manifests = render(helm, str(values_file))
    config = work / "config.yaml"
    config.write_text(one(manifests, "ConfigMap")["data"]["config.yaml"], encoding="utf-8")
    token = "app-token"  # what authToken.existingSecret gives the sidecar
    log = (work / "sidecar.log").open("w")
    proc = subprocess.Popen(
        [kafka_sidecar_script(), "run", "--config", str(config)],
        env={**clean_env(), "KAFKA_SIDECAR_LISTEN__AUTH_TOKEN": token},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        # Up once the subscription's health is known (it stays NOT_SERVING: no Kafka).
        deadline = time.monotonic() + 60
        with grpc.insecure_channel(f"127.0.0.1:{health_port}") as channel:
            check = health_pb2_grpc.HealthStub(channel).Check
            while True:
                assert proc.poll() is None, (work / "sidecar.log").read_text()
                try:
                    check(health_pb2.HealthCheckRequest(service="orders"), timeout=2)
                    break
                except grpc.RpcError:
                    assert time.monotonic() < deadline, (work / "sidecar.log").read_text()
                    time.sleep(0.2)
        yield RunningSidecar(
            socket=work / "sock" / "sidecar.sock",
            socket_group=fs_group,
            api_port=api_port,
            health_port=health_port,
            metrics_port=metrics_port,
            container=sidecar_container(pod_spec(manifests)),
            token=token,
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_probes_reach_the_health_listener_and_nothing_else(
    running_sidecar: RunningSidecar,
) -> None:
    sidecar = running_sidecar
    for probe in PROBES:
        assert sidecar.container[probe]["grpc"] == {"port": sidecar.health_port}
    # As kubelet dials it: the pod IP, no token.
    with grpc.insecure_channel(f"{outside_address()}:{sidecar.health_port}") as channel:
        check = health_pb2_grpc.HealthStub(channel).Check
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", "orders"):  # not joined: there is no Kafka
            assert check(health_pb2.HealthCheckRequest(service=service)).status == not_serving
        with pytest.raises(grpc.RpcError) as unknown:
            check(health_pb2.HealthCheckRequest(service="no-such-subscription"))
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        # The consumer API is not served there, token or not.
        status = pb_grpc.ConsumerServiceStub(channel).GetStatus
        with pytest.raises(grpc.RpcError) as refused:
            status(pb.GetStatusRequest(), metadata=[("authorization", f"Bearer {sidecar.token}")])
        assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_consumer_api_stays_inside_the_pod(running_sidecar: RunningSidecar) -> None:
    sidecar = running_sidecar
    info = sidecar.socket.stat()
    # The sidecar's user and the pod's fsGroup (the app's way in), nobody else.
    assert (stat.S_IMODE(info.st_mode), info.st_gid) == (0o660, sidecar.socket_group)
    auth = [("authorization", f"Bearer {sidecar.token}")]
    for target in (f"unix://{sidecar.socket}", f"127.0.0.1:{sidecar.api_port}"):
        with grpc.insecure_channel(target) as channel:
            reply = pb_grpc.ConsumerServiceStub(channel).GetStatus(
                pb.GetStatusRequest(), metadata=auth, timeout=10
            )
            assert [s.name for s in reply.subscriptions] == ["orders"], target
    outside = outside_address()
    if outside != "127.0.0.1":
        with grpc.insecure_channel(f"{outside}:{sidecar.api_port}") as channel:
            with pytest.raises(grpc.RpcError) as unreachable:
                pb_grpc.ConsumerServiceStub(channel).GetStatus(
                    pb.GetStatusRequest(), metadata=auth, timeout=10
                )
            assert unreachable.value.code() == grpc.StatusCode.UNAVAILABLE


def test_metrics_endpoint_serves_what_operations_md_documents(
    running_sidecar: RunningSidecar,
) -> None:
    """Prometheus scrapes the pod IP; docs/operations.md names every metric it finds there."""
    url = f"http://{outside_address()}:{running_sidecar.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    families = re.findall(r"^# TYPE (\S+) \S+$", text, flags=re.MULTILINE)
    assert "kafka_sidecar_subscription_serving" in families
    assert "process_resident_memory_bytes" in families
    docs = OPERATIONS_MD.read_text(encoding="utf-8")
    section = docs[docs.index("## Metrics and alerts") :]
    # Names as Prometheus shows them (counters with `_total`; a summary's samples add `_count`
    # and `_sum` to its name).
    undocumented = [name for name in families if f"`{name}`" not in section]
    assert not undocumented, f"not in docs/operations.md's Metrics and alerts: {undocumented}"


# --- the named templates, from another chart ------------------------------------------------

PARENT_DEPLOYMENT = """\
{{- $ks := index .Subcharts "kafka-sidecar" }}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ .Release.Name }}-billing
spec:
  replicas: 1
  selector:
    matchLabels: {app: billing}
  template:
    metadata:
      labels: {app: billing}
      annotations:
        checksum/kafka-sidecar: {{ include "kafka-sidecar.configChecksum" $ks }}
    spec:
      terminationGracePeriodSeconds: {{ include "kafka-sidecar.terminationGracePeriodSeconds" $ks }}
      securityContext:
        fsGroup: {{ include "kafka-sidecar.socketGroup" $ks }}
      initContainers:
        {{- include "kafka-sidecar.container" $ks | nindent 8 }}
      containers:
        - name: billing
          image: registry.example.com/billing:7.0.0
          securityContext:
            runAsUser: 2000
          env:
            {{- include "kafka-sidecar.appEnv" $ks | nindent 12 }}
          volumeMounts:
            {{- include "kafka-sidecar.appVolumeMounts" $ks | nindent 12 }}
      volumes:
        {{- include "kafka-sidecar.volumes" $ks | nindent 8 }}
"""

PARENT_VALUES: dict[str, Any] = {
    "kafka-sidecar": {
        "deployment": {"enabled": False},
        "sidecar": {
            "image": {"repository": "registry.example.com/kafka-sidecar", "tag": "0.1.0"},
            "config": {
                "kafka": {"bootstrap_servers": "kafka-0.kafka:9092"},
                "subscriptions": [
                    {"name": "invoices", "topics": ["invoices"], "group_id": "billing"}
                ],
                "shutdown_grace_ms": 20000,
            },
        },
    }
}


def test_named_templates_add_the_sidecar_to_another_chart(helm: str, tmp_path: Path) -> None:
    parent = tmp_path / "billing"
    (parent / "templates").mkdir(parents=True)
    (parent / "Chart.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v2",
                "name": "billing",
                "version": "1.0.0",
                "dependencies": [{"name": "kafka-sidecar", "version": "0.1.0"}],
            }
        ),
        encoding="utf-8",
    )
    (parent / "values.yaml").write_text(json.dumps(PARENT_VALUES), encoding="utf-8")
    (parent / "templates" / "deployment.yaml").write_text(PARENT_DEPLOYMENT, encoding="utf-8")
    # An unpacked dependency, as `helm dependency build` would leave it (packed).
    shutil.copytree(CHART, parent / "charts" / "kafka-sidecar")

    proc = run_helm(helm, "template", "acme", str(parent))
    assert proc.returncode == 0, proc.stderr
    manifests = [doc for doc in yaml.safe_load_all(proc.stdout) if doc]
    # With deployment.enabled=false the subchart renders its ConfigMap alone.
    assert sorted(m["kind"] for m in manifests) == ["ConfigMap", "Deployment"]
    for manifest in manifests:
        validate(manifest, NATIVE_VERSIONS[-1])

    spec = pod_spec(manifests)
    sidecar = spec["initContainers"][0]
    assert sidecar["name"] == "kafka-sidecar"
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["image"] == "registry.example.com/kafka-sidecar:0.1.0"
    # It brings its own non-root context and probes; the app keeps its own user.
    assert sidecar["securityContext"]["runAsNonRoot"] is True
    assert sidecar["readinessProbe"]["grpc"] == {"port": 50052}
    assert spec["containers"][0]["securityContext"] == {"runAsUser": 2000}
    assert spec["terminationGracePeriodSeconds"] == 20 + 20 + 15
    configmap = one(manifests, "ConfigMap")
    config_volume = next(v for v in spec["volumes"] if v["name"] == "kafka-sidecar-config")
    assert config_volume["configMap"]["name"] == configmap["metadata"]["name"]
    assert "kafka-0.kafka:9092" in configmap["data"]["config.yaml"]
    # The pod gives the app the socket's group, as the README shows.
    listen = yaml.safe_load(configmap["data"]["config.yaml"])["listen"]
    assert (listen["unix_socket_mode"], listen["unix_socket_group"]) == ("0660", 10001)
    assert spec["securityContext"] == {"fsGroup": 10001}
