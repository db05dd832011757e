"""Lag-based autoscaling with KEDA (charts/kafka-sidecar/templates/keda-scaledobject.yaml).

The chart's ScaledObject and TriggerAuthentication are rendered with helm (tests/test_chart.py's
helpers) and validated as the cluster would take them:

- against KEDA's own CRD schemas (vendored from the KEDA Go module, tests/schemas/keda, with
  their version), made strict as kubernetes-validate makes Kubernetes' schemas (unknown fields
  are errors), with `metadata` checked by kubernetes-validate's own ObjectMeta schema and the
  CRD's one CEL rule checked by hand;
- against what KEDA's `kafka` scaler reads from a trigger (its generated parameter list, also
  vendored): every metadata key one it knows (KEDA ignores unknown ones silently), enums, and
  the scaler's own checks (MSK IAM needs TLS, a region and pod identity `aws`);
- against KEDA's admission webhook's checks (name lengths, unique trigger names, replica
  bounds).

What the triggers say is compared with the sidecar's config as the sidecar itself loads it
(`sidecar.config.load_config`): the same brokers, group and topics, `${VAR}`s expanded alike.
"""

from __future__ import annotations

import copy
import json
import re
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from kubernetes_validate import utils as kv_utils
from referencing import Registry, Resource

from sidecar.config import load_config
from tests import test_chart

ROOT = Path(__file__).resolve().parent.parent
SCHEMAS = ROOT / "tests" / "schemas" / "keda"
OPERATIONS_MD = ROOT / "docs" / "operations.md"
CHART_README = ROOT / "charts" / "kafka-sidecar" / "README.md"
VALUES_YAML = ROOT / "charts" / "kafka-sidecar" / "values.yaml"
#: The KEDA release the vendored schemas come from (tests/schemas/keda/README.md).
KEDA_VERSION = "v2.21.1"

# helm may be built on first use (scripts/ensure-helm).
pytestmark = pytest.mark.timeout(1200)

helm = test_chart.helm
Manifest = dict[str, Any]

ROLE = "arn:aws:iam::123456789012:role/orders-consumer"
OTHER_ROLE = "arn:aws:iam::210987654321:role/msk-reader"


# --- KEDA's schemas --------------------------------------------------------------------------

_K8S_DEFINITIONS = "https://kubernetes.io/api/_definitions.json"
_OBJECT_META = f"{_K8S_DEFINITIONS}#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
#: The CEL rules (x-kubernetes-validations) of the vendored CRDs, each checked by cel_holds.
KNOWN_CEL_RULES = {
    "!has(self.minReplicaCount) || self.minReplicaCount <= (has(self.maxReplicaCount)"
    " ? self.maxReplicaCount : 100)",
}


def _crd(kind: str) -> dict[str, Any]:
    plural = {"ScaledObject": "scaledobjects", "TriggerAuthentication": "triggerauthentications"}
    crd: dict[str, Any] = yaml.safe_load((SCHEMAS / f"keda.sh_{plural[kind]}.yaml").read_text())
    assert crd["spec"]["names"]["kind"] == kind
    return crd


def _openapi(kind: str) -> dict[str, Any]:
    versions = [v for v in _crd(kind)["spec"]["versions"] if v["name"] == "v1alpha1"]
    assert len(versions) == 1, kind
    assert versions[0]["served"], kind
    schema: dict[str, Any] = versions[0]["schema"]["openAPIV3Schema"]
    return schema


def _strict(node: Any) -> Any:
    """A structural OpenAPI v3 schema as JSON Schema 2020-12, unknown fields refused (what the
    API server prunes, or refuses with strict field validation): kubernetes-validate's -strict
    schemas do the same for Kubernetes' own kinds."""
    if isinstance(node, list):
        return [_strict(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {k: _strict(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
    out.pop("nullable", None)
    if node.get("x-kubernetes-int-or-string"):
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    preserve = node.get("x-kubernetes-preserve-unknown-fields")
    if out.get("type") == "object" and "properties" in out and not preserve:
        out.setdefault("additionalProperties", False)
    return out


@cache
def keda_schema(kind: str) -> dict[str, Any]:
    schema: dict[str, Any] = _strict(_openapi(kind))
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = f"https://keda.sh/api/{kind.lower()}/keda/v1alpha1"
    properties = schema["properties"]
    properties["apiVersion"] = {"const": "keda.sh/v1alpha1"}
    properties["kind"] = {"const": kind}
    properties["metadata"] = {"$ref": _OBJECT_META}
    schema["required"] = sorted({*schema.get("required", ()), "apiVersion", "kind", "metadata"})
    return schema


@cache
def _registry(version: str) -> Registry[Any]:
    """kubernetes-validate's strict definitions of `version` (ObjectMeta and the rest)."""
    definitions = kv_utils.schema_contents(
        f"kubernetes-json-schema/v{version}-local-strict/_definitions.json", version
    )
    assert definitions["$id"] == _K8S_DEFINITIONS
    return Resource.from_contents(definitions) @ Registry()


def _cel_rules(node: Any) -> list[str]:
    if isinstance(node, list):
        return [rule for item in node for rule in _cel_rules(item)]
    if not isinstance(node, dict):
        return []
    own = [v["rule"] for v in node.get("x-kubernetes-validations", [])]
    return own + [rule for v in node.values() for rule in _cel_rules(v)]


def cel_holds(manifest: Manifest) -> bool:
    """The ScaledObject CRD's one CEL rule (KNOWN_CEL_RULES), on spec."""
    spec = manifest["spec"]
    return "minReplicaCount" not in spec or spec["minReplicaCount"] <= spec.get(
        "maxReplicaCount", 100
    )


def validate_keda(manifest: Manifest, version: str) -> None:
    """Raises kubernetes_validate.ValidationError unless the API server (Kubernetes `version`,
    KEDA's CRDs installed) would take `manifest` as it is."""
    kind = manifest["kind"]
    validator = jsonschema.Draft202012Validator(keda_schema(kind), registry=_registry(version))
    try:
        validator.validate(manifest)
    except jsonschema.ValidationError as exc:
        raise kubernetes_validate.ValidationError(exc, version) from None
    if kind == "ScaledObject" and not cel_holds(manifest):
        raise kubernetes_validate.ValidationError(
            jsonschema.ValidationError(
                "minReplicaCount must be less than or equal to maxReplicaCount"
            ),
            version,
        )


# --- what KEDA's kafka scaler and admission webhook check -----------------------------------


@cache
def kafka_parameters() -> dict[str, dict[str, Any]]:
    data = json.loads((SCHEMAS / "kafka-scaler-parameters.json").read_text())
    assert KEDA_VERSION in data["source"]
    [scaler] = [s for s in data["scalers"] if s["type"] == "kafka"]
    return {p["name"]: p for p in scaler["parameters"]}


def _flag(values: dict[str, str], name: str) -> bool:
    value = str(values.get(name, kafka_parameters()[name].get("default", "false")))
    assert value in {"true", "false"}, f"{name}: {value!r} is not a boolean"
    return value == "true"


def check_kafka_trigger(trigger: dict[str, Any], auth: Manifest | None) -> None:
    """What KEDA's kafka scaler (pkg/scalers/kafka_scaler.go) makes of one trigger: it reads
    only the parameters it knows (so any other key is a silent mistake) and refuses what its
    Validate refuses."""
    params = kafka_parameters()
    metadata: dict[str, str] = trigger["metadata"]
    for key, value in metadata.items():
        assert key in params, f"the kafka scaler has no parameter {key!r}: KEDA would ignore it"
        assert params[key].get("metadataVariableReadable"), f"{key} is not read from metadata"
        allowed = params[key].get("allowedValue")
        assert allowed is None or value in allowed, f"{key}={value!r} not in {allowed}"
        if params[key].get("default") in {"true", "false"}:
            _flag(metadata, key)
    auth_params: dict[str, str] = {}
    pod_identity: dict[str, Any] = {}
    if auth is not None:
        pod_identity = auth["spec"].get("podIdentity", {})
        for ref in auth["spec"].get("secretTargetRef", []):
            name = ref["parameter"]
            assert params[name].get("triggerAuthenticationVariableReadable"), name
            auth_params[name] = f"<{ref['name']}/{ref['key']}>"
    for name, param in params.items():
        if not param.get("optional") and "default" not in param:
            assert metadata.get(name), f"{name} is required"
    assert int(metadata.get("lagThreshold", "10")) > 0
    assert int(metadata.get("activationLagThreshold", "0")) >= 0
    flags = {**auth_params, **metadata}  # triggerMetadata first, then authParams (order=)
    assert not (_flag(flags, "allowIdleConsumers") and _flag(flags, "limitToPartitionsWithLag"))
    assert not (
        _flag(flags, "limitToPartitionsWithLag")
        and _flag(flags, "ensureEvenDistributionOfPartitions")
    )
    tls = flags.get("tls", "disable")
    sasl = flags.get("sasl", "none")
    if tls == "enable":
        assert ("cert" in auth_params) == ("key" in auth_params), "cert and key go together"
    if sasl in {"plaintext", "scram_sha256", "scram_sha512"}:
        assert {"username", "password"} <= set(auth_params), f"{sasl} needs username, password"
    if sasl == "oauthbearer":
        provider = flags.get("saslTokenProvider", "bearer")
        assert provider == "aws_msk_iam", "only MSK IAM tokens here"
        assert tls == "enable", "TLS is required for AWS MSK authentication"
        assert metadata.get("awsRegion"), "no awsRegion given"
        assert pod_identity.get("provider") == "aws", "MSK IAM credentials come from pod identity"
        assert not (pod_identity.get("roleArn") and pod_identity.get("identityOwner"))


def check_webhook(scaled_object: Manifest) -> None:
    """KEDA's admission webhook (apis/keda/v1alpha1/scaledobject_webhook.go), as far as it
    looks at the object alone."""
    name = scaled_object["metadata"]["name"]
    spec = scaled_object["spec"]
    hpa = spec.get("advanced", {}).get("horizontalPodAutoscalerConfig", {})
    assert len(name) <= 63
    assert len(hpa.get("name") or f"keda-hpa-{name}") <= 63
    names = [t["name"] for t in spec["triggers"] if t.get("name")]
    assert len(names) == len(set(names)), "trigger names must be unique"
    assert spec.get("minReplicaCount", 0) <= spec.get("maxReplicaCount", 100)


def keda_objects(manifests: list[Manifest]) -> list[Manifest]:
    return [m for m in manifests if m["apiVersion"].startswith("keda.sh/")]


def check_all(manifests: list[Manifest]) -> tuple[Manifest, Manifest | None]:
    """Validates everything rendered; returns the ScaledObject and its TriggerAuthentication."""
    for version in test_chart.NATIVE_VERSIONS:
        for manifest in manifests:
            if manifest["apiVersion"].startswith("keda.sh/"):
                try:
                    validate_keda(manifest, version)
                except kubernetes_validate.ValidationError as exc:
                    name = f"{manifest['kind']}/{manifest['metadata']['name']}"
                    pytest.fail(f"{name} is not valid for KEDA {KEDA_VERSION}: {exc.message}")
            else:
                test_chart.validate(manifest, version)
    scaled_object = test_chart.one(manifests, "ScaledObject")
    auths = [m for m in manifests if m["kind"] == "TriggerAuthentication"]
    assert len(auths) <= 1
    auth = auths[0] if auths else None
    check_webhook(scaled_object)
    for trigger in scaled_object["spec"]["triggers"]:
        assert trigger["type"] == "kafka"
        ref = trigger.get("authenticationRef")
        if auth is None:
            assert ref is None
        else:
            assert ref == {"name": auth["metadata"]["name"]}
        check_kafka_trigger(trigger, auth)
    return scaled_object, auth


# --- rendering -------------------------------------------------------------------------------


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """helm's -f merge: maps merge key by key, anything else is replaced."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


_files = iter(range(1_000_000))


def values_file(tmp_path: Path, base: str | None, extra: dict[str, Any]) -> str:
    """A values file: the chart's ci file `base` (a name of tests/test_chart.py's VALUES) with
    `extra` merged over it, as `-f base -f extra` would."""
    source = test_chart.VALUES[base] if base is not None else None
    values = yaml.safe_load(source.read_text()) if source is not None else {}
    path = tmp_path / f"values-{next(_files)}.yaml"
    path.write_text(yaml.safe_dump(_merge(values, extra)), encoding="utf-8")
    return str(path)


def render(helm: str, tmp_path: Path, base: str | None, extra: dict[str, Any]) -> list[Manifest]:
    return test_chart.render(helm, values_file(tmp_path, base, extra))


def render_error(helm: str, tmp_path: Path, base: str | None, extra: dict[str, Any]) -> str:
    return test_chart.render_error(helm, values_file(tmp_path, base, extra))


def triggers_by_name(scaled_object: Manifest) -> dict[str, dict[str, str]]:
    return {t["name"]: t["metadata"] for t in scaled_object["spec"]["triggers"]}


def effective_config(manifests: list[Manifest], environ: dict[str, str], tmp_path: Path) -> Any:
    path = tmp_path / f"config-{next(_files)}.yaml"
    path.write_text(test_chart.one(manifests, "ConfigMap")["data"]["config.yaml"])
    return load_config(path, environ={"POD_NAME": "orders-0", "POD_NAMESPACE": "shop", **environ})


KEDA_ON = {
    "keda": {"enabled": True, "partitions": 12},
    "podDisruptionBudget": {"minAvailable": None},
}


# --- tests -----------------------------------------------------------------------------------


def test_vendored_schemas_are_the_noted_keda_version() -> None:
    note = (SCHEMAS / "README.md").read_text()
    assert f"github.com/kedacore/keda/v2 {KEDA_VERSION}" in note
    assert KEDA_VERSION in OPERATIONS_MD.read_text()
    # Every CEL rule of the CRDs is one validate_keda checks by hand.
    rules = set(_cel_rules(_crd("ScaledObject"))) | set(_cel_rules(_crd("TriggerAuthentication")))
    assert rules == KNOWN_CEL_RULES
    # The scaler parameters the chart relies on, as this KEDA spells them.
    params = kafka_parameters()
    assert params["sasl"]["allowedValue"] == [
        "none", "plaintext", "scram_sha256", "scram_sha512", "oauthbearer", "gssapi"
    ]  # fmt: skip
    assert params["saslTokenProvider"]["allowedValue"] == ["bearer", "aws_msk_iam"]
    assert params["tls"]["allowedValue"] == ["enable", "disable"]
    assert params["offsetResetPolicy"]["allowedValue"] == ["latest", "earliest"]
    assert params["lagThreshold"]["default"] == "10"


@pytest.mark.parametrize("values", list(test_chart.VALUES))
def test_off_by_default(helm: str, values: str) -> None:
    assert not keda_objects(test_chart.render(helm, values))


def test_msk_iam_scales_the_apps_deployment_on_the_sidecars_group(
    helm: str, tmp_path: Path
) -> None:
    manifests = render(helm, tmp_path, "irsa-monitoring", KEDA_ON)
    scaled_object, auth = check_all(manifests)
    deployment = test_chart.one(manifests, "Deployment")
    # The HPA owns the count: a `helm upgrade` must not set it back to replicaCount.
    assert "replicas" not in deployment["spec"]
    assert (
        "replicas"
        in test_chart.one(render(helm, tmp_path, "irsa-monitoring", {}), "Deployment")["spec"]
    )
    spec = scaled_object["spec"]
    assert spec["scaleTargetRef"] == {
        "apiVersion": deployment["apiVersion"],
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    # At most one pod per partition; one pod at least.
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (1, 12)

    # The sidecar's own view of its config: the same brokers, group, topic and region.
    config = effective_config(manifests, {}, tmp_path)
    [subscription] = config.subscriptions
    assert triggers_by_name(scaled_object) == {
        "orders/orders": {
            "bootstrapServers": ",".join(config.kafka.bootstrap_servers),
            "consumerGroup": subscription.group_id,
            "topic": "orders",
            # The window a pod holds uncommitted while it keeps up (1 stream).
            "lagThreshold": str(subscription.window.max_outstanding_records),
            "activationLagThreshold": "0",
            "offsetResetPolicy": subscription.consumer.auto_offset_reset,
            "tls": "enable",
            "sasl": "oauthbearer",
            "saslTokenProvider": "aws_msk_iam",
            "awsRegion": config.kafka.aws.region,
        }
    }
    assert config.kafka.aws.region == "eu-west-1"
    # KEDA's operator assumes the sidecar's role: the one KEDA_ON gives the pod.
    assert auth is not None
    assert auth["spec"] == {"podIdentity": {"provider": "aws", "roleArn": ROLE}}
    account = test_chart.one(manifests, "ServiceAccount")
    assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"] == ROLE
    assert test_chart.pod_spec(manifests)["serviceAccountName"] == account["metadata"]["name"]


SECRETS = [
    {"parameter": "username", "name": "kafka-scram", "key": "username"},
    {"parameter": "password", "name": "kafka-scram", "key": "password"},
]


def test_one_trigger_per_topic_of_each_group_subscription(helm: str, tmp_path: Path) -> None:
    extra = {
        "keda": {
            "enabled": True,
            "partitions": 6,
            "minReplicaCount": 2,
            "streams": 2,
            "subscriptions": {"clicks": {"lagThreshold": 5000, "activationLagThreshold": 50}},
            "secretTargetRef": SECRETS,
            "extraMetadata": {"excludePersistentLag": True},
        }
    }
    manifests = render(helm, tmp_path, "subscriptions", extra)
    scaled_object, auth = check_all(manifests)
    triggers = triggers_by_name(scaled_object)
    # The snapshot subscription (brands) joins no group: nothing to scale on.
    assert sorted(triggers) == ["clicks/clicks", "clicks/clicks-mobile", "receipts/ereceipts"]

    env = {"ENV": "staging", "SCRAM_PASSWORD": "x"}
    config = effective_config(manifests, env, tmp_path)
    subs = {s.name: s for s in config.subscriptions}
    servers = ",".join(config.kafka.bootstrap_servers)
    receipts = triggers["receipts/ereceipts"]
    # ${ENV} expanded as the sidecar expands it, from sidecar.env's literal value.
    assert receipts["consumerGroup"] == subs["receipts"].group_id == "ereceipt-ml-submitter-staging"
    assert receipts["bootstrapServers"] == servers
    assert receipts["topic"] == "ereceipts"
    # streams times the subscription's window (2000 records in this file).
    assert receipts["lagThreshold"] == str(2 * subs["receipts"].window.max_outstanding_records)
    assert receipts["activationLagThreshold"] == "0"
    for topic in ("clicks", "clicks-mobile"):
        clicks = triggers[f"clicks/{topic}"]
        assert clicks["consumerGroup"] == subs["clicks"].group_id
        assert (clicks["topic"], clicks["lagThreshold"], clicks["activationLagThreshold"]) == (
            topic,
            "5000",
            "50",
        )
    for metadata in triggers.values():
        assert (metadata["tls"], metadata["sasl"]) == ("enable", "scram_sha512")
        assert metadata["excludePersistentLag"] == "true"
        assert "saslTokenProvider" not in metadata
    # SCRAM: KEDA's own credentials from a Secret, no pod identity.
    assert auth is not None
    assert auth["spec"] == {"secretTargetRef": SECRETS}
    assert scaled_object["spec"]["minReplicaCount"] == 2


def test_a_subscription_can_be_left_out(helm: str, tmp_path: Path) -> None:
    extra = {
        "keda": {
            "enabled": True,
            "maxReplicaCount": 4,
            "secretTargetRef": SECRETS,
            "subscriptions": {"clicks": {"enabled": False}},
        }
    }
    scaled_object, _ = check_all(render(helm, tmp_path, "subscriptions", extra))
    assert sorted(triggers_by_name(scaled_object)) == ["receipts/ereceipts"]
    assert scaled_object["spec"]["maxReplicaCount"] == 4


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        pytest.param({"serviceAccount": {"roleArn": ROLE}}, {"roleArn": ROLE}, id="irsa-role"),
        pytest.param(
            {"serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": ROLE}}},
            {"roleArn": ROLE},
            id="irsa-annotation",
        ),
        # The sidecar assumes another role on top of the pod's: that one has the MSK policy.
        pytest.param(
            {
                "serviceAccount": {"roleArn": ROLE},
                "sidecar": {"config": {"kafka": {"aws": {"role_arn": OTHER_ROLE}}}},
            },
            {"roleArn": OTHER_ROLE},
            id="sidecar-role-arn",
        ),
        pytest.param(
            {"serviceAccount": {"roleArn": ROLE}, "keda": {"aws": {"roleArn": OTHER_ROLE}}},
            {"roleArn": OTHER_ROLE},
            id="explicit",
        ),
        pytest.param(
            {"keda": {"aws": {"identityOwner": "keda"}}}, {"identityOwner": "keda"}, id="keda"
        ),
        # An existing service account: KEDA reads its KEDA_ON annotation itself.
        pytest.param(
            {"serviceAccount": {"create": False, "name": "orders"}},
            {"identityOwner": "workload"},
            id="existing-account",
        ),
    ],
)
def test_keda_assumes_the_sidecars_role(
    helm: str, tmp_path: Path, extra: dict[str, Any], expected: dict[str, str]
) -> None:
    manifests = render(helm, tmp_path, None, _merge(KEDA_ON, extra))
    _, auth = check_all(manifests)
    assert auth is not None
    assert auth["spec"] == {"podIdentity": {"provider": "aws", **expected}}


def test_a_parent_charts_workload(helm: str, tmp_path: Path) -> None:
    extra = _merge(
        KEDA_ON, {"deployment": {"enabled": False}, "keda": {"scaleTargetRef": {"name": "billing"}}}
    )
    manifests = render(helm, tmp_path, None, extra)
    scaled_object, auth = check_all(manifests)
    assert scaled_object["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "billing",
    }
    assert auth is not None
    assert auth["spec"]["podIdentity"] == {"provider": "aws", "identityOwner": "workload"}


@pytest.mark.parametrize(
    "kafka",
    [
        pytest.param({"security_protocol": "PLAINTEXT"}, id="plaintext"),
        pytest.param({"security_protocol": "SSL"}, id="tls"),
    ],
)
def test_without_credentials_there_is_no_trigger_authentication(
    helm: str, tmp_path: Path, kafka: dict[str, Any]
) -> None:
    extra = _merge(
        KEDA_ON,
        {
            "sidecar": {
                "config": {
                    "kafka": {"bootstrap_servers": ["kafka-0.kafka:9092"], "sasl_mechanism": None}
                    | kafka
                }
            }
        },
    )
    scaled_object, auth = check_all(render(helm, tmp_path, None, extra))
    assert auth is None
    [metadata] = triggers_by_name(scaled_object).values()
    assert metadata.get("tls", "disable") == (
        "enable" if kafka["security_protocol"] == "SSL" else "disable"
    )
    assert "sasl" not in metadata


@pytest.mark.parametrize(
    ("config", "env", "expected"),
    [
        pytest.param("app-${ENV}", [{"name": "ENV", "value": "prod"}], "app-prod", id="literal"),
        pytest.param("app-${ENV:-dev}", [], "app-dev", id="default"),
        # Shell semantics: a set but empty variable takes the default too.
        pytest.param("app-${ENV:-dev}", [{"name": "ENV", "value": ""}], "app-dev", id="empty"),
        pytest.param("app-${ENV}x", [{"name": "ENV", "value": ""}], "app-x", id="empty-no-default"),
        pytest.param("price$$-${ENV}", [{"name": "ENV", "value": "a"}], "price$-a", id="dollar"),
        pytest.param("$${ENV}", [{"name": "ENV", "value": "a"}], "${ENV}", id="escaped"),
        pytest.param("${POD_NAMESPACE}-orders", [], "shop-orders", id="namespace"),
        # The last definition of a name wins, as in Kubernetes.
        pytest.param(
            "${A}${B:-b}",
            [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}, {"name": "A", "value": "3"}],
            "32",
            id="last-wins",
        ),
    ],
)
def test_group_ids_expand_as_the_sidecar_expands_them(
    helm: str, tmp_path: Path, config: str, env: list[dict[str, str]], expected: str
) -> None:
    extra = _merge(
        KEDA_ON,
        {
            "serviceAccount": {"roleArn": ROLE},
            "sidecar": {
                "env": env,
                "config": {
                    "subscriptions": [{"name": "orders", "topics": ["orders"], "group_id": config}]
                },
            },
        },
    )
    manifests = render(helm, tmp_path, None, extra)
    scaled_object, _ = check_all(manifests)
    [metadata] = triggers_by_name(scaled_object).values()
    literal = {}
    for item in env:
        literal[item["name"]] = item["value"]
    assert metadata["consumerGroup"] == expected
    assert effective_config(manifests, literal, tmp_path).subscriptions[0].group_id == expected


def test_what_only_the_pod_knows_can_be_given_to_keda(helm: str, tmp_path: Path) -> None:
    base = _merge(
        KEDA_ON,
        {
            "serviceAccount": {"roleArn": ROLE},
            "sidecar": {
                "env": [
                    {
                        "name": "ENV",
                        "valueFrom": {"configMapKeyRef": {"name": "env", "key": "env"}},
                    },
                    {"name": "BROKERS", "valueFrom": {"secretKeyRef": {"name": "b", "key": "b"}}},
                ],
                "config": {
                    "kafka": {"bootstrap_servers": "${BROKERS}"},
                    "subscriptions": [
                        {
                            "name": "orders",
                            "topics": "${TOPICS:-orders,returns}",
                            "group_id": "g-${ENV}",
                        }
                    ],
                },
            },
        },
    )
    error = render_error(helm, tmp_path, None, base)
    assert "needs ${BROKERS}, which only the pod can expand" in error
    assert "set keda.bootstrapServers" in error
    error = render_error(
        helm, tmp_path, None, _merge(base, {"keda": {"bootstrapServers": ["b-1:9098"]}})
    )
    assert "sidecar.config.subscriptions[orders].group_id" in error
    assert "set keda.subscriptions.orders.consumerGroup" in error
    given = {
        "keda": {
            "bootstrapServers": "b-1:9098, b-2:9098",
            "subscriptions": {"orders": {"consumerGroup": "g-prod"}},
        }
    }
    scaled_object, _ = check_all(render(helm, tmp_path, None, _merge(base, given)))
    triggers = triggers_by_name(scaled_object)
    # A comma-separated default gives one trigger per topic.
    assert sorted(triggers) == ["orders/orders", "orders/returns"]
    for metadata in triggers.values():
        assert metadata["bootstrapServers"] == "b-1:9098,b-2:9098"
        assert metadata["consumerGroup"] == "g-prod"


def test_a_long_release_name_gets_an_hpa_name_that_fits(helm: str, tmp_path: Path) -> None:
    extra = _merge(KEDA_ON, {"serviceAccount": {"roleArn": ROLE}, "fullnameOverride": "o" * 60})
    scaled_object, _ = check_all(render(helm, tmp_path, None, extra))
    hpa = scaled_object["spec"]["advanced"]["horizontalPodAutoscalerConfig"]
    assert hpa["name"] == "o" * 60


def test_default_behavior_limits_rebalances(helm: str, tmp_path: Path) -> None:
    extra = _merge(KEDA_ON, {"serviceAccount": {"roleArn": ROLE}})
    scaled_object, _ = check_all(render(helm, tmp_path, None, extra))
    behavior = scaled_object["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= 300
    assert behavior["scaleDown"]["policies"] == [{"type": "Pods", "value": 1, "periodSeconds": 300}]
    assert (
        behavior["scaleUp"]["stabilizationWindowSeconds"]
        >= 2 * scaled_object["spec"]["pollingInterval"]
    )
    # And it can be replaced, with a fallback for when KEDA cannot read the lag.
    custom = {
        "keda": {
            "behavior": {"scaleUp": {"stabilizationWindowSeconds": 0}},
            "fallback": {"failureThreshold": 3, "replicas": 4},
        }
    }
    scaled_object, _ = check_all(render(helm, tmp_path, None, _merge(extra, custom)))
    spec = scaled_object["spec"]
    assert spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"] == {
        # helm merges maps: what is not set (or set to null) stays as the default has it.
        "scaleUp": {**behavior["scaleUp"], "stabilizationWindowSeconds": 0},
        "scaleDown": behavior["scaleDown"],
    }
    assert spec["fallback"] == {"failureThreshold": 3, "replicas": 4}


IAM_ROLE = _merge(KEDA_ON, {"serviceAccount": {"roleArn": ROLE}})


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        pytest.param(
            {"keda": {"partitions": None}},
            "keda.partitions: set it to the most partitions any subscribed topic has",
            id="no-partitions",
        ),
        pytest.param(
            {"keda": {"minReplicaCount": 5, "partitions": 4}},
            "keda.maxReplicaCount (4, from keda.partitions unless set) must be at least"
            " keda.minReplicaCount (5)",
            id="max-below-min",
        ),
        pytest.param(
            {"podDisruptionBudget": {"minAvailable": 1}},
            "podDisruptionBudget.minAvailable (1) would block every eviction",
            id="pdb",
        ),
        pytest.param(
            {"serviceAccount": {"roleArn": ""}},
            "keda.aws.roleArn: set it to the sidecar's IAM role",
            id="pod-identity",
        ),
        pytest.param(
            {"keda": {"aws": {"roleArn": OTHER_ROLE, "identityOwner": "keda"}}},
            "keda.aws: set roleArn or identityOwner, not both",
            id="role-and-owner",
        ),
        pytest.param(
            {"sidecar": {"config": {"kafka": {"security_protocol": "SASL_PLAINTEXT"}}}},
            "KEDA's kafka scaler does MSK IAM over TLS only",
            id="iam-without-tls",
        ),
        pytest.param(
            {"sidecar": {"config": {"kafka": {"aws": {"region": None}}}}},
            "keda.aws.region: set it",
            id="no-region",
        ),
        pytest.param(
            {
                "sidecar": {
                    "config": {
                        "kafka": {
                            "sasl_mechanism": "SCRAM-SHA-512",
                            "sasl_username": "u",
                            "sasl_password": "${P}",
                        }
                    }
                }
            },
            "SCRAM-SHA-512 needs KEDA's own credentials",
            id="scram-without-secrets",
        ),
        pytest.param(
            {
                "sidecar": {
                    "config": {
                        "kafka": {
                            "security_protocol": "SSL",
                            "sasl_mechanism": None,
                            "ssl": {"cafile": "/etc/ca.pem"},
                        }
                    }
                }
            },
            "sidecar.config.kafka.ssl.cafile is set, so KEDA needs the CA too",
            id="private-ca",
        ),
        pytest.param(
            {"keda": {"subscriptions": {"order": {"lagThreshold": 10}}}},
            "keda.subscriptions.order: no subscription of that name",
            id="unknown-subscription",
        ),
        pytest.param(
            {"keda": {"subscriptions": {"orders": {"enabled": False}}}},
            "keda: no triggers",
            id="no-triggers",
        ),
        pytest.param(
            {"sidecar": {"config": {"subscriptions": [{"name": "o", "topics": ["o"]}]}}},
            "keda: sidecar.config.subscriptions[o] has no group_id",
            id="no-group",
        ),
        pytest.param(
            {"deployment": {"enabled": False}},
            "keda.scaleTargetRef.name: set it",
            id="parent-chart-target",
        ),
        pytest.param(
            {
                "sidecar": {
                    "config": {"subscriptions": [{"name": "o", "topics": "o", "group_id": "${X"}]}
                }
            },
            "has a malformed reference",
            id="malformed",
        ),
    ],
)
def test_rendering_refuses_what_keda_could_not_use(
    helm: str, tmp_path: Path, extra: dict[str, Any], message: str
) -> None:
    assert message in render_error(helm, tmp_path, None, _merge(IAM_ROLE, extra))


@pytest.mark.parametrize(
    ("extra", "path"),
    [
        ({"keda": {"extraMetadata": {"lagTreshold": "5"}}}, "/keda/extraMetadata"),
        # The chart sets these itself.
        ({"keda": {"extraMetadata": {"topic": "x"}}}, "/keda/extraMetadata"),
        ({"keda": {"extraMetadata": {"excludePersistentLag": "yes"}}}, "/keda/extraMetadata"),
        ({"keda": {"aws": {"identityOwner": "pod"}}}, "/keda/aws/identityOwner"),
        ({"keda": {"subscriptions": {"orders": {"lagTreshold": 5}}}}, "/keda/subscriptions"),
        ({"keda": {"subscriptions": {"orders": {"lagThreshold": 0}}}}, "/keda/subscriptions"),
        (
            {"keda": {"secretTargetRef": [{"parameter": "token", "name": "s", "key": "k"}]}},
            "/keda/secretTargetRef",
        ),
        ({"keda": {"partitions": 0}}, "/keda/partitions"),
        ({"keda": {"minReplicaCont": 1}}, "/keda"),
    ],
)
def test_values_schema_checks_keda(
    helm: str, tmp_path: Path, extra: dict[str, Any], path: str
) -> None:
    assert path in render_error(helm, tmp_path, None, _merge(IAM_ROLE, extra))


def test_lint_with_keda(helm: str, tmp_path: Path) -> None:
    values = values_file(tmp_path, "irsa-monitoring", KEDA_ON)
    proc = test_chart.run_helm(helm, "lint", "--strict", str(test_chart.CHART), "-f", values)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "[ERROR]" not in output, output
    assert "[WARNING]" not in output, output


# --- the validation itself -------------------------------------------------------------------


def _break(manifest: Manifest, change: Any) -> Manifest:
    broken = copy.deepcopy(manifest)
    change(broken)
    return broken


def _trigger(manifest: Manifest) -> dict[str, Any]:
    trigger: dict[str, Any] = manifest["spec"]["triggers"][0]
    return trigger


def test_validation_catches_what_keda_would_refuse_or_ignore(helm: str, tmp_path: Path) -> None:
    manifests = render(helm, tmp_path, None, IAM_ROLE)
    scaled_object, auth = check_all(manifests)
    assert auth is not None
    version = test_chart.LATEST

    # The CRD schema: unknown fields, wrong types, a bad enum, a missing name; the CEL rule;
    # ObjectMeta from kubernetes-validate.
    schema_breaks = [
        lambda m: m["spec"].update(maxReplicas=3),
        lambda m: _trigger(m)["metadata"].update(lagThreshold=1000),
        lambda m: _trigger(m).update(authenticationRef={"name": "x", "kind": "Secret"}),
        lambda m: m["spec"]["scaleTargetRef"].pop("name"),
        lambda m: m["spec"].update(minReplicaCount=20),
        lambda m: m["metadata"].update(labels={"a": 1}),
        lambda m: m["metadata"].update(nmae="x"),
    ]
    for change in schema_breaks:
        with pytest.raises(kubernetes_validate.ValidationError):
            validate_keda(_break(scaled_object, change), version)
    for change in [
        lambda m: m["spec"]["podIdentity"].update(provider="aws-iam"),
        lambda m: m["spec"]["podIdentity"].update(roleArn=1),
        lambda m: m["spec"].update(podIdentitty={}),
    ]:
        with pytest.raises(kubernetes_validate.ValidationError):
            validate_keda(_break(auth, change), version)

    # The scaler: a misspelt key (KEDA would ignore it), a bad enum value, MSK IAM's needs.
    scaler_breaks = [
        lambda m: _trigger(m)["metadata"].update(lagTreshold="5"),
        lambda m: _trigger(m)["metadata"].update(sasl="aws_msk_iam"),
        lambda m: _trigger(m)["metadata"].update(tls="disable"),
        lambda m: _trigger(m)["metadata"].pop("awsRegion"),
        lambda m: _trigger(m)["metadata"].pop("consumerGroup"),
        lambda m: _trigger(m)["metadata"].update(lagThreshold="0"),
        lambda m: _trigger(m)["metadata"].update(allowIdleConsumers="yes"),
    ]
    for change in scaler_breaks:
        broken = _break(scaled_object, change)
        with pytest.raises(AssertionError):
            check_kafka_trigger(_trigger(broken), auth)
    with pytest.raises(AssertionError):
        check_kafka_trigger(
            _trigger(scaled_object), _break(auth, lambda m: m["spec"].pop("podIdentity"))
        )
    with pytest.raises(AssertionError):
        check_webhook(_break(scaled_object, lambda m: m["metadata"].update(name="x" * 60)))


# --- the docs --------------------------------------------------------------------------------


def test_docs_explain_every_keda_value() -> None:
    docs = OPERATIONS_MD.read_text()
    start = docs.index("### Autoscaling with KEDA")
    assert start < docs.index("## Shutdown ordering")
    section = docs[start : docs.index("## Shutdown ordering")]
    readme = CHART_README.read_text()
    assert "`keda.enabled: true`" in readme
    values = yaml.safe_load(VALUES_YAML.read_text())["keda"]
    missing = [key for key in values if not re.search(rf"`keda\.{key}\b", section + readme)]
    assert not missing, (
        f"keda values explained in neither docs/operations.md nor the README: {missing}"
    )
    # The sizing rules it states are the ones the chart applies.
    assert re.search(r"streams.{0,40}max_outstanding_records", section, flags=re.DOTALL)
