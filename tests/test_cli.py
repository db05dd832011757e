"""The installed `kafka-sidecar` console script, run as a real process (exit codes included)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar import __version__

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "sidecar.yaml"


def _script() -> str:
    # The venv running the tests is the one the project is installed in.
    found = shutil.which("kafka-sidecar", path=str(Path(sys.executable).parent))
    found = found or shutil.which("kafka-sidecar")
    if found is None:
        pytest.fail("kafka-sidecar console script not installed (pip install -e .)")
    return found


def sidecar(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the script with an environment free of the caller's sidecar and AWS settings."""
    clean = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("KAFKA_SIDECAR_")
        and key not in {"AWS_REGION", "AWS_DEFAULT_REGION", "KAFKA_CA_FILE"}
    }
    return subprocess.run(
        [_script(), *args],
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def write(directory: Path, data: dict[str, Any]) -> Path:
    path = directory / "sidecar.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def valid(**kafka: Any) -> dict[str, Any]:
    return {
        "kafka": {
            "bootstrap_servers": "127.0.0.1:19096",
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": "SCRAM-SHA-512",
            "sasl_username": "app",
            "sasl_password": "the-scram-password",
            **kafka,
        },
        "subscriptions": [{"name": "orders", "topics": ["orders"], "group_id": "orders-app"}],
    }


def test_version() -> None:
    done = sidecar("--version")
    assert (done.returncode, done.stdout) == (0, f"kafka-sidecar {__version__}\n")


def test_help() -> None:
    done = sidecar("--help")
    assert done.returncode == 0
    assert done.stdout.startswith("usage: kafka-sidecar")
    assert "check-config" in done.stdout
    assert "run" in done.stdout


@pytest.mark.parametrize("command", ["check-config", "run"])
def test_subcommand_help(command: str) -> None:
    done = sidecar(command, "--help")
    assert done.returncode == 0
    assert done.stdout.startswith(f"usage: kafka-sidecar {command}")
    assert "--config FILE" in done.stdout
    assert "KAFKA_SIDECAR_CONFIG" in done.stdout


def test_no_command_prints_help_and_fails() -> None:
    done = sidecar()
    assert done.returncode == 2
    assert done.stderr.startswith("usage: kafka-sidecar")


def test_check_config_prints_effective_config_with_secrets_masked(tmp_path: Path) -> None:
    path = write(tmp_path, valid())
    done = sidecar("check-config", str(path), env={"KAFKA_SIDECAR_LOG__LEVEL": "DEBUG"})
    assert done.returncode == 0, done.stderr
    printed = yaml.safe_load(done.stdout)
    assert printed["kafka"]["sasl_password"] == "**********"
    assert printed["kafka"]["bootstrap_servers"] == ["127.0.0.1:19096"]
    assert printed["log"]["level"] == "DEBUG"
    assert printed["subscriptions"][0]["batch"]["max_records"] == 100
    assert "the-scram-password" not in done.stdout + done.stderr


@pytest.mark.parametrize("how", ["--config", "KAFKA_SIDECAR_CONFIG"])
def test_check_config_other_ways_to_name_the_file(tmp_path: Path, how: str) -> None:
    path = str(write(tmp_path, valid()))
    if how == "--config":
        done = sidecar("check-config", "--config", path)
    else:
        done = sidecar("check-config", env={"KAFKA_SIDECAR_CONFIG": path})
    assert done.returncode == 0, done.stderr
    assert yaml.safe_load(done.stdout)["subscriptions"][0]["name"] == "orders"


def test_check_config_of_the_example() -> None:
    done = sidecar("check-config", str(EXAMPLE), env={"KAFKA_CA_FILE": "/certs/ca.pem"})
    assert done.returncode == 0, done.stderr
    printed = yaml.safe_load(done.stdout)
    assert printed["kafka"]["ssl"]["cafile"] == "/certs/ca.pem"
    assert printed["kafka"]["aws"]["region"] == "us-east-1"


@pytest.mark.parametrize(
    ("data", "env", "expected"),
    [
        pytest.param(valid(colour="red"), {}, ["kafka.colour: unknown key"], id="unknown-key"),
        pytest.param(
            {
                **valid(),
                "subscriptions": [
                    {"name": "o", "topics": ["o"], "group_id": "g", "batch": {"max_records": "x"}}
                ],
            },
            {},
            ["subscriptions[0].batch.max_records: Input should be a valid integer"],
            id="bad-type",
        ),
        pytest.param(
            valid(ssl={"cafile": "${KAFKA_CA_FILE}"}),
            {},
            ["kafka.ssl.cafile: environment variable KAFKA_CA_FILE is not set"],
            id="missing-env-var",
        ),
        pytest.param(
            valid(),
            {"KAFKA_SIDECAR_KAFKA__SASL_MECHANISM": "AWS_MSK_IAM"},
            ["kafka.aws.region: required for AWS_MSK_IAM", "kafka.sasl_username: not used"],
            id="bad-env-override",
        ),
    ],
)
@pytest.mark.parametrize("command", ["check-config", "run"])
def test_invalid_config_exits_2_naming_the_keys(
    tmp_path: Path, command: str, data: dict[str, Any], env: dict[str, str], expected: list[str]
) -> None:
    path = write(tmp_path, data)
    done = sidecar(command, "--config", str(path), env=env)
    assert done.returncode == 2
    assert done.stdout == ""
    header, *lines = done.stderr.splitlines()
    assert header == f"kafka-sidecar: invalid config {path}:"
    for want in expected:
        assert any(line.strip().startswith(want) for line in lines), (want, done.stderr)
    assert "the-scram-password" not in done.stderr


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    done = sidecar("check-config", str(path))
    assert done.returncode == 2
    assert f"{path}: file not found" in done.stderr


@pytest.mark.parametrize("command", ["check-config", "run"])
def test_no_config_at_all(command: str) -> None:
    done = sidecar(command)
    assert done.returncode == 2
    assert "KAFKA_SIDECAR_CONFIG" in done.stderr


def test_check_config_rejects_two_files(tmp_path: Path) -> None:
    path = str(write(tmp_path, valid()))
    done = sidecar("check-config", path, "--config", path)
    assert done.returncode == 2
    assert "not both" in done.stderr
