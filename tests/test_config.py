"""The config contract: defaults, every validation rule, `${VAR}`, env overrides, error texts."""

from __future__ import annotations

import grp
import json
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from pydantic import SecretStr, ValidationError

from sidecar.config import (
    BatchConfig,
    ConfigError,
    KafkaConfig,
    SidecarConfig,
    SubscriptionConfig,
    load_config,
    redacted,
)

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "sidecar.yaml"
MASK = "**********"


def config(
    kafka: dict[str, Any] | None = None, sub: dict[str, Any] | None = None, **top: Any
) -> dict[str, Any]:
    """A minimal valid config, with keys of the kafka section and the one subscription changed."""
    return {
        "kafka": {"bootstrap_servers": "127.0.0.1:19092", **(kafka or {})},
        "subscriptions": [
            {"name": "orders", "topics": ["orders"], "group_id": "orders-app", **(sub or {})}
        ],
        **top,
    }


def write(directory: Path, data: dict[str, Any] | str) -> Path:
    path = directory / "sidecar.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data), encoding="utf-8")
    return path


def load(
    directory: Path, data: dict[str, Any] | str, environ: dict[str, str] | None = None
) -> SidecarConfig:
    return load_config(write(directory, data), environ or {})


def problems(
    directory: Path, data: dict[str, Any] | str, environ: dict[str, str] | None = None
) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(directory, data, environ)
    assert str(caught.value) == "\n".join(caught.value.problems)
    return list(caught.value.problems)


# --- defaults --------------------------------------------------------------------------------


def test_defaults(tmp_path: Path) -> None:
    c = load(tmp_path, config())
    assert c.kafka.bootstrap_servers == ["127.0.0.1:19092"]
    assert c.kafka.security_protocol == "PLAINTEXT"
    assert c.kafka.sasl_mechanism is None
    assert c.kafka.sasl_username is None
    assert c.kafka.sasl_password is None
    assert (c.kafka.aws.region, c.kafka.aws.profile, c.kafka.aws.role_arn) == (None, None, None)
    assert c.kafka.aws.role_session_name == "kafka-sidecar"
    assert (c.kafka.ssl.cafile, c.kafka.ssl.certfile, c.kafka.ssl.keyfile) == (None, None, None)
    assert c.kafka.ssl.key_password is None
    assert c.kafka.ssl.check_hostname is True
    assert c.kafka.client_id == "kafka-sidecar"
    assert c.kafka.request_timeout_ms == 40000
    assert c.listen.grpc == ["127.0.0.1:50051"]
    assert c.listen.metrics == "127.0.0.1:9464"
    assert c.listen.auth_token is None
    assert (c.log.level, c.log.format) == ("INFO", "json")
    assert c.shutdown_grace_ms == 30000

    [s] = c.subscriptions
    assert (s.name, s.topics, s.group_id, s.mode) == ("orders", ["orders"], "orders-app", "group")
    assert (s.batch.max_records, s.batch.max_bytes, s.batch.max_wait_ms) == (100, 1048576, 3000)
    assert s.ordering == "partition"
    assert (s.ack_deadline_ms, s.commit_interval_ms) == (60000, 1000)
    assert (s.retry.max_attempts, s.retry.initial_backoff_ms) == (5, 1000)
    assert (s.retry.multiplier, s.retry.max_backoff_ms) == (2.0, 60000)
    assert s.dead_letter is None
    assert s.consumer.auto_offset_reset == "earliest"
    assert (s.consumer.session_timeout_ms, s.consumer.heartbeat_interval_ms) == (45000, 3000)
    assert s.consumer.max_poll_interval_ms == 300000
    assert s.consumer.rebalance_timeout_ms is None
    assert (s.consumer.fetch_max_bytes, s.consumer.max_partition_fetch_bytes) == (52428800, 1048576)
    assert s.consumer.group_instance_id is None
    assert s.window.max_outstanding_batches == 4
    assert s.window.max_outstanding_records == 1000
    assert s.window.max_outstanding_bytes == 16777216
    assert (s.revoke_grace_ms, s.detach_timeout_ms) == (10000, 60000)


def test_config_is_frozen(tmp_path: Path) -> None:
    c = load(tmp_path, config())
    with pytest.raises(ValidationError):
        c.kafka.client_id = "other"
    with pytest.raises(ValidationError):
        c.shutdown_grace_ms = 1


def test_subscription_lookup(tmp_path: Path) -> None:
    data = config()
    data["subscriptions"].append({"name": "brands", "topics": ["brands"], "mode": "snapshot"})
    c = load(tmp_path, data)
    found = c.subscription("brands")
    assert found is not None
    assert found.mode == "snapshot"
    assert c.subscription("nope") is None


def test_built_in_code_without_a_file() -> None:
    c = SidecarConfig(
        kafka=KafkaConfig(bootstrap_servers=["127.0.0.1:19092"]),
        subscriptions=[SubscriptionConfig(name="s", topics=["t"], group_id="g")],
    )
    assert c.subscriptions[0].batch == BatchConfig()


def test_example_config_loads() -> None:
    c = load_config(EXAMPLE, {"KAFKA_CA_FILE": "/certs/ca.pem"})
    assert c.kafka.bootstrap_servers == ["127.0.0.1:19098"]
    assert (c.kafka.security_protocol, c.kafka.sasl_mechanism) == ("SASL_SSL", "AWS_MSK_IAM")
    assert c.kafka.aws.region == "us-east-1"
    assert c.kafka.ssl.cafile == Path("/certs/ca.pem")
    assert [(s.mode, s.group_id) for s in c.subscriptions] == [
        ("group", "example-orders"),
        ("snapshot", None),
    ]


# --- validation ------------------------------------------------------------------------------

SCRAM = {
    "security_protocol": "SASL_SSL",
    "sasl_mechanism": "SCRAM-SHA-512",
    "sasl_username": "user",
    "sasl_password": "pw",
}
IAM = {"security_protocol": "SASL_SSL", "sasl_mechanism": "AWS_MSK_IAM"}


@pytest.mark.parametrize(
    ("kafka", "sub", "expected"),
    [
        pytest.param(
            {"security_protocol": "SASL_SSL"},
            {},
            ["kafka.sasl_mechanism: required with security_protocol SASL_SSL"],
            id="sasl-needs-mechanism",
        ),
        pytest.param(
            {"security_protocol": "SASL_PLAINTEXT"},
            {},
            ["kafka.sasl_mechanism: required with security_protocol SASL_PLAINTEXT"],
            id="sasl-plaintext-needs-mechanism",
        ),
        pytest.param(
            {"sasl_mechanism": "PLAIN", "sasl_username": "u", "sasl_password": "p"},
            {},
            [
                "kafka.sasl_mechanism: only used with SASL_SSL or SASL_PLAINTEXT, not PLAINTEXT",
                "kafka.sasl_username: only used with SASL_SSL or SASL_PLAINTEXT, not PLAINTEXT",
                "kafka.sasl_password: only used with SASL_SSL or SASL_PLAINTEXT, not PLAINTEXT",
            ],
            id="non-sasl-rejects-sasl-settings",
        ),
        pytest.param(
            {"security_protocol": "SSL", "sasl_mechanism": "SCRAM-SHA-256"},
            {},
            ["kafka.sasl_mechanism: only used with SASL_SSL or SASL_PLAINTEXT, not SSL"],
            id="ssl-rejects-mechanism",
        ),
        pytest.param(
            {**SCRAM, "sasl_username": None, "sasl_password": None},
            {},
            [
                "kafka.sasl_username: required for SCRAM-SHA-512",
                "kafka.sasl_password: required for SCRAM-SHA-512",
            ],
            id="scram-512-needs-credentials",
        ),
        pytest.param(
            {**SCRAM, "sasl_mechanism": "SCRAM-SHA-256", "sasl_password": None},
            {},
            ["kafka.sasl_password: required for SCRAM-SHA-256"],
            id="scram-256-needs-password",
        ),
        pytest.param(
            {**SCRAM, "sasl_mechanism": "PLAIN", "sasl_username": None},
            {},
            ["kafka.sasl_username: required for PLAIN"],
            id="plain-needs-username",
        ),
        pytest.param(
            IAM,
            {},
            [
                "kafka.aws.region: "
                "required for AWS_MSK_IAM (or set AWS_REGION or AWS_DEFAULT_REGION)"
            ],
            id="iam-needs-region",
        ),
        pytest.param(
            {**IAM, "aws": {"region": "us-east-1"}, "sasl_username": "u"},
            {},
            ["kafka.sasl_username: not used with AWS_MSK_IAM: credentials come from AWS"],
            id="iam-rejects-username",
        ),
        pytest.param(
            {"security_protocol": "SASL_SSL", "sasl_mechanism": "GSSAPI"},
            {},
            [
                "kafka.sasl_mechanism: Input should be 'AWS_MSK_IAM', 'SCRAM-SHA-512', "
                "'SCRAM-SHA-256' or 'PLAIN'"
            ],
            id="unknown-mechanism",
        ),
        pytest.param(
            {"security_protocol": "TLS"},
            {},
            [
                "kafka.security_protocol: Input should be 'PLAINTEXT', 'SSL', 'SASL_PLAINTEXT' "
                "or 'SASL_SSL'"
            ],
            id="unknown-protocol",
        ),
        pytest.param(
            {"ssl": {"certfile": "/c.pem"}},
            {},
            ["kafka.ssl.keyfile: required with certfile (a client certificate needs its key)"],
            id="certfile-needs-keyfile",
        ),
        pytest.param(
            {"ssl": {"keyfile": "/k.pem"}},
            {},
            ["kafka.ssl.certfile: required with keyfile (a client key needs its certificate)"],
            id="keyfile-needs-certfile",
        ),
        pytest.param(
            {"ssl": {"key_password": "pw"}},
            {},
            ["kafka.ssl.key_password: only used with keyfile"],
            id="key-password-needs-keyfile",
        ),
        pytest.param(
            {"bootstrap_servers": ""},
            {},
            ["kafka.bootstrap_servers: List should have at least 1 item after validation, not 0"],
            id="bootstrap-empty",
        ),
        pytest.param(
            {"bootstrap_servers": ["a:1", "b", "c:0", "d:65536", "e f:1", "g:x"]},
            {},
            [
                "kafka.bootstrap_servers[1]: 'b' is not host:port",
                "kafka.bootstrap_servers[2]: 'c:0' is not host:port",
                "kafka.bootstrap_servers[3]: 'd:65536' is not host:port",
                "kafka.bootstrap_servers[4]: 'e f:1' is not host:port",
                "kafka.bootstrap_servers[5]: 'g:x' is not host:port",
            ],
            id="bootstrap-not-host-port",
        ),
        pytest.param(
            {"request_timeout_ms": 0},
            {},
            ["kafka.request_timeout_ms: Input should be greater than 0"],
            id="request-timeout",
        ),
        pytest.param(
            {},
            {"batch": {"max_records": 0, "max_bytes": 67108865, "max_wait_ms": -1}},
            [
                "subscriptions[0].batch.max_records: Input should be greater than or equal to 1",
                "subscriptions[0].batch.max_bytes: Input should be less than or equal to 67108864",
                "subscriptions[0].batch.max_wait_ms: Input should be greater than or equal to 0",
            ],
            id="batch-low",
        ),
        pytest.param(
            {},
            {"batch": {"max_records": 100001, "max_bytes": 0, "max_wait_ms": 600001}},
            [
                "subscriptions[0].batch.max_records: Input should be less than or equal to 100000",
                "subscriptions[0].batch.max_bytes: Input should be greater than or equal to 1",
                "subscriptions[0].batch.max_wait_ms: Input should be less than or equal to 600000",
            ],
            id="batch-high",
        ),
        pytest.param(
            {},
            {
                "window": {
                    "max_outstanding_batches": 0,
                    "max_outstanding_records": 0,
                    "max_outstanding_bytes": 0,
                }
            },
            [
                f"subscriptions[0].window.{key}: Input should be greater than or equal to 1"
                for key in (
                    "max_outstanding_batches",
                    "max_outstanding_records",
                    "max_outstanding_bytes",
                )
            ],
            id="window",
        ),
        pytest.param(
            {},
            {"retry": {"max_attempts": 0, "initial_backoff_ms": -1, "multiplier": 0.5}},
            [
                "subscriptions[0].retry.max_attempts: Input should be greater than or equal to 1",
                "subscriptions[0].retry.initial_backoff_ms: "
                "Input should be greater than or equal to 0",
                "subscriptions[0].retry.multiplier: Input should be greater than or equal to 1",
            ],
            id="retry-ranges",
        ),
        pytest.param(
            {},
            {"retry": {"initial_backoff_ms": 5000, "max_backoff_ms": 4999}},
            ["subscriptions[0].retry.max_backoff_ms: must be >= initial_backoff_ms (5000)"],
            id="retry-backoff-order",
        ),
        pytest.param(
            {},
            {"consumer": {"session_timeout_ms": 10000, "heartbeat_interval_ms": 10000}},
            [
                "subscriptions[0].consumer.heartbeat_interval_ms: "
                "must be less than session_timeout_ms (10000)"
            ],
            id="heartbeat-below-session",
        ),
        pytest.param(
            {},
            {"consumer": {"auto_offset_reset": "none"}},
            ["subscriptions[0].consumer.auto_offset_reset: Input should be 'earliest' or 'latest'"],
            id="offset-reset",
        ),
        pytest.param(
            {},
            {"name": "-orders"},
            ["subscriptions[0].name: String should match pattern '^[A-Za-z0-9][A-Za-z0-9._-]*$'"],
            id="name-pattern",
        ),
        pytest.param(
            {},
            {"topics": []},
            ["subscriptions[0].topics: List should have at least 1 item after validation, not 0"],
            id="topics-empty",
        ),
        pytest.param(
            {},
            {"topics": ["a", "b", "a", "b"]},
            [
                "subscriptions[0].topics[2]: duplicate of topics[0] ('a')",
                "subscriptions[0].topics[3]: duplicate of topics[1] ('b')",
            ],
            id="topics-duplicate",
        ),
        pytest.param(
            {},
            {"topics": ["has space"]},
            ["subscriptions[0].topics[0]: String should match pattern '^[A-Za-z0-9._-]{1,249}$'"],
            id="topic-name",
        ),
        pytest.param(
            {},
            {"group_id": None},
            ["subscriptions[0].group_id: required with mode group"],
            id="group-needs-group-id",
        ),
        pytest.param(
            {},
            {"mode": "snapshot", "dead_letter": {"topic": "orders.dlq"}},
            [
                "subscriptions[0].group_id: not used with mode snapshot (it never joins a group)",
                "subscriptions[0].dead_letter: not used with mode snapshot (it never commits)",
            ],
            id="snapshot-rejects-group-and-dlq",
        ),
        pytest.param(
            {},
            {"dead_letter": {"topic": "orders"}},
            [
                "subscriptions[0].dead_letter.topic: "
                "is one of this subscription's topics: failures would loop"
            ],
            id="dlq-not-a-source-topic",
        ),
        pytest.param(
            {},
            {"mode": "stream"},
            ["subscriptions[0].mode: Input should be 'group' or 'snapshot'"],
            id="mode",
        ),
        pytest.param(
            {},
            {"ordering": "total"},
            ["subscriptions[0].ordering: Input should be 'partition', 'key' or 'none'"],
            id="ordering",
        ),
        pytest.param(
            {},
            {"ack_deadline_ms": 999, "commit_interval_ms": 9},
            [
                "subscriptions[0].ack_deadline_ms: Input should be greater than or equal to 1000",
                "subscriptions[0].commit_interval_ms: Input should be greater than or equal to 10",
            ],
            id="deadline-and-commit-interval",
        ),
    ],
)
def test_rule(
    tmp_path: Path, kafka: dict[str, Any], sub: dict[str, Any], expected: list[str]
) -> None:
    assert problems(tmp_path, config(kafka, sub)) == expected


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        ({"grpc": []}, "listen.grpc: List should have at least 1 item after validation, not 0"),
        (
            {"grpc": ["unix://relative.sock"]},
            "listen.grpc[0]: 'unix://relative.sock': a Unix socket is written unix:///absolute/path",
        ),
        (
            {"grpc": [f"unix:///{'s' * 107}"]},
            f"listen.grpc[0]: 'unix:///{'s' * 107}': a Unix socket path is at most 107 bytes",
        ),
        (
            {"grpc": ["127.0.0.1:50051", "localhost"]},
            "listen.grpc[1]: 'localhost' is not host:port",
        ),
        ({"metrics": "9464"}, "listen.metrics: '9464' is not host:port"),
        ({"metrics": 9464}, "listen.metrics: Input should be a valid string"),
    ],
)
def test_listen_rules(tmp_path: Path, listen: dict[str, Any], expected: str) -> None:
    assert problems(tmp_path, config(listen=listen)) == [expected]


@pytest.mark.parametrize(
    ("top", "expected"),
    [
        (
            {"subscriptions": []},
            "subscriptions: List should have at least 1 item after validation, not 0",
        ),
        (
            {"log": {"level": "LOUD"}},
            "log.level: Input should be 'DEBUG', 'INFO', 'WARNING' or 'ERROR'",
        ),
        ({"log": {"format": "xml"}}, "log.format: Input should be 'json' or 'text'"),
        (
            {"shutdown_grace_ms": -1},
            "shutdown_grace_ms: Input should be greater than or equal to 0",
        ),
    ],
)
def test_top_level_rules(tmp_path: Path, top: dict[str, Any], expected: str) -> None:
    assert problems(tmp_path, {**config(), **top}) == [expected]


def test_missing_sections(tmp_path: Path) -> None:
    assert problems(tmp_path, {"log": {"level": "INFO"}}) == [
        "kafka: Field required",
        "subscriptions: Field required",
    ]


def test_subscription_names_unique(tmp_path: Path) -> None:
    data = config()
    data["subscriptions"] += [
        {"name": "brands", "topics": ["brands"], "mode": "snapshot"},
        {"name": "orders", "topics": ["other"], "group_id": "g2"},
    ]
    assert problems(tmp_path, data) == [
        "subscriptions[2].name: duplicate of subscriptions[0] ('orders')"
    ]


@pytest.mark.parametrize(
    ("kafka", "sub", "top"),
    [
        pytest.param(SCRAM, {}, {}, id="scram"),
        pytest.param({**SCRAM, "security_protocol": "SASL_PLAINTEXT"}, {}, {}, id="sasl-plaintext"),
        pytest.param(
            {
                **IAM,
                "aws": {"region": "eu-west-1", "profile": "p", "role_arn": "arn:aws:iam::1:role/r"},
            },
            {},
            {},
            id="iam-profile-and-role",
        ),
        pytest.param(
            {
                "security_protocol": "SSL",
                "ssl": {"certfile": "c.pem", "keyfile": "k.pem", "key_password": "pw"},
            },
            {},
            {},
            id="mtls",
        ),
        pytest.param(
            {"bootstrap_servers": ["[::1]:9092", "b-1.msk.example:9098"]}, {}, {}, id="ipv6-and-dns"
        ),
        pytest.param(
            {},
            {"batch": {"max_records": 100000, "max_bytes": 67108864, "max_wait_ms": 600000}},
            {},
            id="batch-maximums",
        ),
        pytest.param(
            {},
            {"batch": {"max_records": 1, "max_bytes": 1, "max_wait_ms": 0}},
            {},
            id="batch-minimums",
        ),
        pytest.param(
            {}, {"retry": {"initial_backoff_ms": 0, "max_backoff_ms": 0}}, {}, id="retry-no-backoff"
        ),
        pytest.param(
            {}, {"ack_deadline_ms": 1000, "commit_interval_ms": 10}, {}, id="deadline-minimums"
        ),
        pytest.param({}, {"mode": "snapshot", "group_id": None}, {}, id="snapshot"),
        pytest.param({}, {"ordering": "none", "name": "a.b_c-9"}, {}, id="ordering-none"),
        pytest.param(
            {},
            {},
            {"listen": {"grpc": [f"unix:///{'s' * 106}", "0.0.0.0:0"], "metrics": None}},
            id="listen-unix-any-port-no-metrics",
        ),
        pytest.param(
            {}, {}, {"log": {"level": "debug", "format": "text"}}, id="log-level-any-case"
        ),
    ],
)
def test_accepted(
    tmp_path: Path, kafka: dict[str, Any], sub: dict[str, Any], top: dict[str, Any]
) -> None:
    load(tmp_path, config(kafka, sub, **top))


def test_iam_region_from_environment(tmp_path: Path) -> None:
    data = config(IAM)
    both = {"AWS_REGION": "eu-west-1", "AWS_DEFAULT_REGION": "eu-central-1"}
    assert load(tmp_path, data, both).kafka.aws.region == "eu-west-1"
    only_default = {"AWS_DEFAULT_REGION": "eu-central-1"}
    assert load(tmp_path, data, only_default).kafka.aws.region == "eu-central-1"
    explicit = config({**IAM, "aws": {"region": "us-east-1"}})
    assert load(tmp_path, explicit, both).kafka.aws.region == "us-east-1"


def test_every_problem_reported_at_once(tmp_path: Path) -> None:
    data = config(
        {"request_timeout_ms": -5, "colour": "red"},
        {"batch": {"max_records": 0}, "window": {"max_outstanding_batches": "four"}},
        log={"level": "LOUD"},
    )
    found = problems(tmp_path, data)
    assert [line.split(":")[0] for line in found] == [
        "kafka.request_timeout_ms",
        "kafka.colour",
        "subscriptions[0].batch.max_records",
        "subscriptions[0].window.max_outstanding_batches",
        "log.level",
    ]


# --- unknown keys and bad types ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({**config(), "colour": "red"}, "colour: unknown key"),
        (config({"colour": "red"}), "kafka.colour: unknown key"),
        (config({"ssl": {"ca_file": "/ca.pem"}}), "kafka.ssl.ca_file: unknown key"),
        (config({"aws": {"regoin": "us-east-1"}}), "kafka.aws.regoin: unknown key"),
        (config(listen={"port": 1}), "listen.port: unknown key"),
        (config(sub={"colour": "red"}), "subscriptions[0].colour: unknown key"),
        (
            config(sub={"batch": {"max_record": 5}}),
            "subscriptions[0].batch.max_record: unknown key",
        ),
        (
            config(sub={"dead_letter": {"topic": "d", "x": 1}}),
            "subscriptions[0].dead_letter.x: unknown key",
        ),
    ],
)
def test_unknown_key_named_by_path(tmp_path: Path, data: dict[str, Any], expected: str) -> None:
    assert problems(tmp_path, data) == [expected]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            config(sub={"batch": {"max_records": "lots"}}),
            "subscriptions[0].batch.max_records: Input should be a valid integer, "
            "unable to parse string as an integer",
        ),
        (
            config({"ssl": {"check_hostname": "maybe"}}),
            "kafka.ssl.check_hostname: Input should be a valid boolean, unable to interpret input",
        ),
        (
            config(sub={"retry": "often"}),
            "subscriptions[0].retry: Input should be a valid dictionary or instance of RetryConfig",
        ),
        (config({"client_id": ["a"]}), "kafka.client_id: Input should be a valid string"),
        (
            {**config(), "subscriptions": {"name": "x"}},
            "subscriptions: Input should be a valid list",
        ),
    ],
)
def test_bad_type_named_by_path(tmp_path: Path, data: dict[str, Any], expected: str) -> None:
    assert problems(tmp_path, data) == [expected]


# --- ${VAR} expansion ------------------------------------------------------------------------


def test_expansion(tmp_path: Path) -> None:
    text = """
kafka:
  bootstrap_servers: ${BROKERS}
  client_id: ${APP}-${ENV:-dev}-$$HOME-$${NOT_EXPANDED}
  ssl: {cafile: "${CERTS}/ca.pem"}
  security_protocol: ${PROTOCOL:-SSL}
listen:
  grpc: ["unix://${RUN_DIR:-/run}/sidecar.sock", "${HOST:-127.0.0.1}:${PORT:-50051}"]
  metrics: ${METRICS:-}
subscriptions:
  - name: orders
    topics: ["ereceipts-${ENV:-dev}"]
    group_id: ereceipt-ml-submitter-${ENV:-dev}
    batch: {max_records: "${MAX_RECORDS:-7}"}
"""
    environ = {
        "BROKERS": "b-1:9094,b-2:9094",
        "APP": "shop",
        "CERTS": "/certs",
        "HOST": "",
        "PORT": "6000",
        "ENV": "prod",
    }
    c = load(tmp_path, text, environ)
    assert c.kafka.bootstrap_servers == ["b-1:9094", "b-2:9094"]
    assert c.kafka.client_id == "shop-prod-$HOME-${NOT_EXPANDED}"
    assert c.kafka.ssl.cafile == Path("/certs/ca.pem")
    assert c.kafka.security_protocol == "SSL"
    # `:-` also replaces a variable set to the empty string, as in the shell.
    assert c.listen.grpc == ["unix:///run/sidecar.sock", "127.0.0.1:6000"]
    # A blank optional value means "not set".
    assert c.listen.metrics is None
    [s] = c.subscriptions
    assert (s.topics, s.group_id) == (["ereceipts-prod"], "ereceipt-ml-submitter-prod")
    assert s.batch.max_records == 7


def test_expanded_values_are_not_parsed_as_yaml(tmp_path: Path) -> None:
    c = load(tmp_path, config({"client_id": "${ID}"}), {"ID": "{evil: [1]}\nkafka: x"})
    assert c.kafka.client_id == "{evil: [1]}\nkafka: x"


def test_set_but_empty_without_default_is_empty(tmp_path: Path) -> None:
    c = load(tmp_path, config({"client_id": "x${EMPTY}y"}), {"EMPTY": ""})
    assert c.kafka.client_id == "xy"


def test_missing_variable_named_with_key_path(tmp_path: Path) -> None:
    data = config(
        {"ssl": {"cafile": "${CA_FILE}"}, "bootstrap_servers": ["a:1", "${BROKER}"]},
        {"group_id": "submitter-${ENV}"},
    )
    assert problems(tmp_path, data, {"CA_FILE": "/ca.pem"}) == [
        "kafka.bootstrap_servers[1]: environment variable BROKER is not set and has no default",
        "subscriptions[0].group_id: environment variable ENV is not set and has no default",
    ]


@pytest.mark.parametrize("value", ["${1ABC}", "${UNCLOSED", "${}", "${A:B}"])
def test_malformed_reference(tmp_path: Path, value: str) -> None:
    assert problems(tmp_path, config({"client_id": value}), {"A": "a"}) == [
        "kafka.client_id: malformed reference: write ${NAME}, ${NAME:-default} or $$"
    ]


@given(st.text(alphabet=st.sampled_from("${}:-_ABab09 .é\\\"'")))
def test_escaping_every_dollar_gives_the_text_back(text: str) -> None:
    with tempfile.TemporaryDirectory() as directory:
        escaped = text.replace("$", "$$")
        c = load(Path(directory), config({"client_id": escaped}), {"A": "x", "AB": "y"})
    assert c.kafka.client_id == text


# --- environment overrides -------------------------------------------------------------------


def test_env_overrides_beat_the_file(tmp_path: Path) -> None:
    data = config({"client_id": "from-file"}, log={"level": "INFO", "format": "text"})
    c = load(
        tmp_path,
        data,
        {
            "KAFKA_SIDECAR_KAFKA__BOOTSTRAP_SERVERS": "a:1, b:2",
            "KAFKA_SIDECAR_KAFKA__SSL__CHECK_HOSTNAME": "false",
            "kafka_sidecar_log__level": "DEBUG",
            "KAFKA_SIDECAR_LISTEN__GRPC": "unix:///run/s.sock,127.0.0.1:7000",
            "KAFKA_SIDECAR_LISTEN__METRICS": "",
            "KAFKA_SIDECAR_SHUTDOWN_GRACE_MS": "5000",
        },
    )
    assert c.kafka.bootstrap_servers == ["a:1", "b:2"]
    assert c.kafka.ssl.check_hostname is False
    assert c.kafka.client_id == "from-file"
    assert (c.log.level, c.log.format) == ("DEBUG", "text")
    assert c.listen.grpc == ["unix:///run/s.sock", "127.0.0.1:7000"]
    assert c.listen.metrics is None
    assert c.shutdown_grace_ms == 5000


def test_env_override_of_structured_value_as_json(tmp_path: Path) -> None:
    subs = [{"name": "brands", "topics": ["brands"], "mode": "snapshot"}]
    c = load(tmp_path, config(), {"KAFKA_SIDECAR_SUBSCRIPTIONS": json.dumps(subs)})
    assert [s.name for s in c.subscriptions] == ["brands"]


def test_env_override_errors_name_the_key(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        config(),
        {
            "KAFKA_SIDECAR_KAFKA__COLOUR": "red",
            "KAFKA_SIDECAR_LOG__LEVEL": "LOUD",
            "KAFKA_SIDECAR_KAFKA__REQUEST_TIMEOUT_MS": "soon",
        },
    )
    assert found == [
        "kafka.request_timeout_ms: "
        "Input should be a valid integer, unable to parse string as an integer",
        "kafka.colour: unknown key",
        "log.level: Input should be 'DEBUG', 'INFO', 'WARNING' or 'ERROR'",
    ]
    [bad_json] = problems(tmp_path, config(), {"KAFKA_SIDECAR_SUBSCRIPTIONS": "[oops"})
    assert bad_json.startswith("subscriptions: override from the environment is not valid JSON")


def test_environ_argument_replaces_os_environ(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KAFKA_SIDECAR_LOG__LEVEL", "ERROR")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    monkeypatch.setenv("CLIENT", "from-os")
    path = write(tmp_path, config({**IAM, "client_id": "${CLIENT:-default}"}))

    own = load_config(path, {"AWS_REGION": "ap-south-1"})
    assert (own.log.level, own.kafka.aws.region, own.kafka.client_id) == (
        "INFO",
        "ap-south-1",
        "default",
    )

    ambient = load_config(path)
    assert (ambient.log.level, ambient.kafka.aws.region, ambient.kafka.client_id) == (
        "ERROR",
        "eu-west-1",
        "from-os",
    )


def test_path_from_environment(tmp_path: Path) -> None:
    path = write(tmp_path, config())
    assert (
        load_config(environ={"KAFKA_SIDECAR_CONFIG": str(path)}).subscriptions[0].name == "orders"
    )
    with pytest.raises(ConfigError, match="no config file: give one or set KAFKA_SIDECAR_CONFIG"):
        load_config(environ={})


# --- file errors -----------------------------------------------------------------------------


def test_file_not_found(tmp_path: Path) -> None:
    path = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError) as caught:
        load_config(path, {})
    assert caught.value.problems == (f"{path}: file not found",)
    assert caught.value.path == path


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    text = "kafka:\n  bootstrap_servers: a:1\n subscriptions: []\n"
    found = problems(tmp_path, text)
    assert found == [
        f"{tmp_path / 'sidecar.yaml'}:3:2: expected <block end>, but found '<block mapping start>'"
    ]


def test_duplicate_yaml_key_names_file_and_line(tmp_path: Path) -> None:
    text = "kafka: {bootstrap_servers: 'a:1'}\nsubscriptions: []\nkafka: {}\n"
    assert problems(tmp_path, text) == [f"{tmp_path / 'sidecar.yaml'}:3:1: duplicate key 'kafka'"]


def test_yaml_merge_keys_allowed(tmp_path: Path) -> None:
    text = """
kafka: {bootstrap_servers: "a:1"}
subscriptions:
  - &orders {name: orders, topics: [orders], group_id: g, batch: {max_records: 5}}
  - <<: *orders
    name: refunds
    topics: [refunds]
"""
    c = load(tmp_path, text)
    assert [(s.name, s.batch.max_records) for s in c.subscriptions] == [
        ("orders", 5),
        ("refunds", 5),
    ]


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    assert problems(tmp_path, "- kafka\n") == [
        f"{tmp_path / 'sidecar.yaml'}: the top level must be a mapping of sections"
    ]


def test_empty_file(tmp_path: Path) -> None:
    assert problems(tmp_path, "") == ["kafka: Field required", "subscriptions: Field required"]


# --- redaction -------------------------------------------------------------------------------

SECRETS = ("scram-pass-1", "key-pass-2", "app-token-3")


def test_redacted_masks_every_secret(tmp_path: Path) -> None:
    data = config(
        {
            **SCRAM,
            "sasl_password": SECRETS[0],
            "ssl": {"certfile": "/c.pem", "keyfile": "/k.pem", "key_password": SECRETS[1]},
        },
        listen={"auth_token": SECRETS[2]},
    )
    c = load(tmp_path, data)
    assert isinstance(c.kafka.sasl_password, SecretStr)
    assert c.kafka.sasl_password.get_secret_value() == SECRETS[0]

    plain = redacted(c)
    assert plain["kafka"]["sasl_password"] == MASK
    assert plain["kafka"]["ssl"]["key_password"] == MASK
    assert plain["listen"]["auth_token"] == MASK
    assert plain["kafka"]["ssl"]["certfile"] == "/c.pem"
    for text in (json.dumps(plain), yaml.safe_dump(plain), repr(c), str(c)):
        assert not any(secret in text for secret in SECRETS)


def test_redacted_is_the_whole_effective_config(tmp_path: Path) -> None:
    c = load(tmp_path, config(), {"KAFKA_SIDECAR_LOG__LEVEL": "DEBUG"})
    plain = redacted(c)
    assert plain["log"]["level"] == "DEBUG"
    assert plain["subscriptions"][0]["window"]["max_outstanding_records"] == 1000
    # Plain data: it goes through yaml.safe_dump and loads back equal.
    assert yaml.safe_load(yaml.safe_dump(plain)) == plain


# --- the Unix socket's mode and group ----------------------------------------------------------


def test_unix_socket_is_owner_and_group_only_by_default(tmp_path: Path) -> None:
    c = load(tmp_path, config())
    assert c.listen.unix_socket_mode == 0o660
    assert c.listen.unix_socket_group is None  # the group it is created with


@pytest.mark.parametrize("mode", ["0640", "640", 0o640])
def test_unix_socket_mode_is_octal(tmp_path: Path, mode: str | int) -> None:
    assert load(tmp_path, config(listen={"unix_socket_mode": mode})).listen.unix_socket_mode == (
        0o640
    )


def test_unix_socket_mode_unquoted_in_yaml_is_octal(tmp_path: Path) -> None:
    text = yaml.safe_dump(config()) + "listen:\n  unix_socket_mode: 0600\n"
    assert load(tmp_path, text).listen.unix_socket_mode == 0o600


def test_unix_socket_group_by_name(tmp_path: Path) -> None:
    group = grp.getgrgid(os.getgid())  # a group this host surely has: our own
    c = load(tmp_path, config(listen={"unix_socket_group": group.gr_name}))
    assert c.listen.unix_socket_group == group.gr_gid
    # From the environment too, resolved the same way.
    c = load(tmp_path, config(), {"KAFKA_SIDECAR_LISTEN__UNIX_SOCKET_GROUP": group.gr_name})
    assert c.listen.unix_socket_group == group.gr_gid


@pytest.mark.parametrize("gid", [4242, "4242", 0, 4294967294])
def test_unix_socket_group_by_gid_needs_no_group_entry(tmp_path: Path, gid: int | str) -> None:
    # A pod's fsGroup rarely has an /etc/group entry in the sidecar's image.
    c = load(tmp_path, config(listen={"unix_socket_group": gid}))
    assert c.listen.unix_socket_group == int(gid)
    assert redacted(c)["listen"]["unix_socket_group"] == int(gid)


def test_unix_socket_group_blank_is_unset(tmp_path: Path) -> None:
    text = yaml.safe_dump(config(listen={"unix_socket_group": "${SOCKET_GROUP:-}"}))
    assert load(tmp_path, text).listen.unix_socket_group is None


def test_unknown_unix_socket_group_is_a_config_error_naming_the_key(tmp_path: Path) -> None:
    name = f"no-such-group-{uuid.uuid4().hex[:8]}"
    assert problems(tmp_path, config(listen={"unix_socket_group": name})) == [
        f"listen.unix_socket_group: unknown group {name!r}: not in this host's group database"
        " (a gid need not be)"
    ]
    env = {"KAFKA_SIDECAR_LISTEN__UNIX_SOCKET_GROUP": name}
    [problem] = problems(tmp_path, config(), env)
    assert problem.startswith(f"listen.unix_socket_group: unknown group {name!r}")


@pytest.mark.parametrize(
    ("group", "expected"),
    [
        (-1, "Input should be greater than or equal to 0"),
        (4294967295, "Input should be less than or equal to 4294967294"),
        (True, "must be a group name or a numeric gid"),
        (1.5, "Input should be a valid integer, got a number with a fractional part"),
    ],
)
def test_unix_socket_group_rules(tmp_path: Path, group: object, expected: str) -> None:
    assert problems(tmp_path, config(listen={"unix_socket_group": group})) == [
        f"listen.unix_socket_group: {expected}"
    ]
