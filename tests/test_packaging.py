"""Installing the sidecar resolves nothing named kafka-sidecar* from a package index.

`kafka-sidecar-client` is not a registered name on PyPI: anyone could publish it. So the
sidecar's wheel ships the `kafkasidecar` package (generated stubs and client) itself, from
clients/python/src, and depends on no kafka-sidecar* distribution. Checked here: the wheel built
from the checkout and from the Dockerfile's build context, the client's own wheel, what pip
resolves for `pip install .` (against the real index), and that editable installs of the
sidecar and of the client never share a file (the dev venv may hold both).

Needs the network (pip fetches hatchling for the builds and resolves the sidecar's
dependencies from the index); about 40 s.
"""

from __future__ import annotations

import email.parser
import json
import re
import shutil
import subprocess
import sys
import zipfile
from email.message import Message
from pathlib import Path

import pytest

from sidecar import __version__
from tests.localkafka import ROOT

CLIENT_SRC = ROOT / "clients" / "python" / "src"
PACKAGE = CLIENT_SRC / "kafkasidecar"

pytestmark = pytest.mark.timeout(600)


def pip(*args: str, cwd: Path = ROOT, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, f"pip {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def normalized(name: str) -> str:
    """A distribution name as indexes compare them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def build_wheel(source: Path, out: Path) -> Path:
    pip("wheel", "--no-deps", "--quiet", "-w", str(out), str(source))
    [wheel] = out.glob("*.whl")
    return wheel


def metadata(wheel: Path) -> Message:
    with zipfile.ZipFile(wheel) as archive:
        [name] = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        return email.parser.Parser().parsestr(archive.read(name).decode())


def requirement_names(meta: Message) -> set[str]:
    names = set()
    for requirement in meta.get_all("Requires-Dist") or []:
        match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
        assert match, requirement
        names.add(normalized(match[1]))
    return names


def package_sources() -> dict[str, bytes]:
    """Every file of clients/python/src/kafkasidecar, as the wheel should ship it."""
    files = {
        f"kafkasidecar/{path.relative_to(PACKAGE).as_posix()}": path.read_bytes()
        for path in PACKAGE.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    }
    assert "kafkasidecar/v1/consumer_pb2.py" in files
    return files


def shipped(wheel: Path, top: str) -> dict[str, bytes]:
    with zipfile.ZipFile(wheel) as archive:
        return {n: archive.read(n) for n in archive.namelist() if n.startswith(f"{top}/")}


@pytest.fixture(scope="module")
def sidecar_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_wheel(ROOT, tmp_path_factory.mktemp("wheel"))


def test_wheel_ships_kafkasidecar_and_requires_no_kafka_sidecar_distribution(
    sidecar_wheel: Path,
) -> None:
    meta = metadata(sidecar_wheel)
    assert meta["Name"] == "kafka-sidecar"
    names = requirement_names(meta)  # every extra's too (dev, otel)
    assert {"grpcio", "protobuf", "aiokafka"} <= names
    assert not {name for name in names if name.startswith("kafka-sidecar")}, names

    files = shipped(sidecar_wheel, "kafkasidecar")
    for name in (
        "kafkasidecar/__init__.py",
        "kafkasidecar/py.typed",
        "kafkasidecar/v1/__init__.py",
        "kafkasidecar/v1/consumer_pb2.py",
        "kafkasidecar/v1/consumer_pb2_grpc.py",
    ):
        assert name in files, name
    # The whole package, the client's modules whatever they are, exactly as in the checkout.
    assert files == package_sources()
    assert "sidecar/server.py" in shipped(sidecar_wheel, "sidecar")
    with zipfile.ZipFile(sidecar_wheel) as archive:
        tops = {name.split("/")[0] for name in archive.namelist()}
    assert tops == {"sidecar", "kafkasidecar", f"kafka_sidecar-{__version__}.dist-info"}, tops


def test_dockerfile_context_builds_the_same_wheel(sidecar_wheel: Path, tmp_path: Path) -> None:
    """The builder stage's COPY lines (through .dockerignore's allow-list) are enough for it."""
    allowed = {
        line[1:].rstrip("/")
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.startswith("!")
    }
    context = tmp_path / "src"
    context.mkdir()
    copies = 0
    for line in (ROOT / "Dockerfile").read_text(encoding="utf-8").splitlines():
        if not line.startswith("COPY ") or "--from" in line:
            continue
        *sources, dest = line.split()[1:]
        for source in sources:
            assert source.rstrip("/") in allowed, f"{source}: not in .dockerignore's allow-list"
            src, target = ROOT / source, context / dest
            if src.is_dir():
                shutil.copytree(src, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, target / src.name)
            copies += 1
    assert copies >= 3
    wheel = build_wheel(context, tmp_path / "out")
    assert shipped(wheel, "kafkasidecar") == shipped(sidecar_wheel, "kafkasidecar")
    assert set(shipped(wheel, "sidecar")) == set(shipped(sidecar_wheel, "sidecar"))


def test_client_distribution_stays_its_own(tmp_path: Path) -> None:
    """For apps: the same package, and nothing of the sidecar's Kafka, AWS or config libraries."""
    wheel = build_wheel(ROOT / "clients" / "python", tmp_path)
    meta = metadata(wheel)
    assert meta["Name"] == "kafka-sidecar-client"
    assert requirement_names(meta) == {"grpcio", "protobuf"}
    assert shipped(wheel, "kafkasidecar") == package_sources()


def test_pip_install_resolves_no_kafka_sidecar_name_from_an_index(tmp_path: Path) -> None:
    """What `pip install .` from the checkout would install, resolved against the real index."""
    report = tmp_path / "report.json"
    pip(
        "install",
        "--dry-run",
        "--ignore-installed",
        "--quiet",
        "--report",
        str(report),
        ".",
    )
    items = json.loads(report.read_text(encoding="utf-8"))["install"]
    names = {normalized(item["metadata"]["name"]) for item in items}
    assert {"aiokafka", "grpcio", "protobuf"} <= names, names
    ours = [
        item for item in items if normalized(item["metadata"]["name"]).startswith("kafka-sidecar")
    ]
    assert [normalized(item["metadata"]["name"]) for item in ours] == ["kafka-sidecar"], names
    [project] = ours
    # The checkout itself: a local directory given on the command line, not an index download.
    assert project["is_direct"] is True
    assert project["download_info"]["url"] == ROOT.as_uri()
    assert "dir_info" in project["download_info"]


def search_path_of(python: Path, module: str) -> list[str]:
    """Where `python` would import a package from, found without importing it."""
    proc = subprocess.run(
        [
            str(python),
            "-I",  # not the current folder (or PYTHONPATH): only what the installs put on the path
            "-c",
            "import importlib.machinery, json, sys; "
            f"spec = importlib.machinery.PathFinder.find_spec({module!r}); "
            "print(json.dumps(list(spec.submodule_search_locations) if spec else []))",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    locations: list[str] = json.loads(proc.stdout)
    return locations


def test_editable_sidecar_and_client_never_share_a_file(tmp_path: Path) -> None:
    """The dev venv's case: the sidecar alone provides `kafkasidecar`; with the client also
    installed editable, uninstalling either leaves the other working."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    target = ("--python", str(python))
    client = str(ROOT / "clients" / "python")
    here = [str(PACKAGE)]

    pip(*target, "install", "--quiet", "--no-deps", "-e", str(ROOT))
    assert search_path_of(python, "kafkasidecar") == here
    assert search_path_of(python, "sidecar") == [str(ROOT / "sidecar")]

    pip(*target, "install", "--quiet", "--no-deps", "-e", client)
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    owned = {}
    for dist in ("kafka_sidecar", "kafka_sidecar_client"):
        [info] = site.glob(f"{dist}-*.dist-info")
        rows = (info / "RECORD").read_text(encoding="utf-8").splitlines()
        paths = {row.split(",")[0] for row in rows}
        owned[dist] = {path for path in paths if path and not path.startswith(f"{info.name}/")}
        # Only path entries (.pth) and scripts: no copy of a package file to go stale.
        assert all(
            path.endswith(".pth") or path.startswith("../../../bin/") for path in owned[dist]
        ), owned[dist]
    assert not owned["kafka_sidecar"] & owned["kafka_sidecar_client"]

    pip(*target, "uninstall", "--quiet", "--yes", "kafka-sidecar-client")
    assert search_path_of(python, "kafkasidecar") == here
    pip(*target, "install", "--quiet", "--no-deps", "-e", client)
    pip(*target, "uninstall", "--quiet", "--yes", "kafka-sidecar")
    assert search_path_of(python, "kafkasidecar") == here  # the client's own, still there
    assert search_path_of(python, "sidecar") == []
