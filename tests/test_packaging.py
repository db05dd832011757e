"""Installing the sidecar resolves nothing named kafka-sidecar* from a package index.

`kafka-sidecar-client` is not a registered name on PyPI: anyone could publish it. So the
sidecar's wheel ships the `kafkasidecar` package (generated stubs and client) itself, from
clients/python/src, and depends on no kafka-sidecar* distribution. Checked here: the wheel built
from the checkout and from the Dockerfile's build context, the client's own wheel, what pip
resolves for `pip install .` (against the real index), and that editable installs of the
sidecar and of the client never share a file (the dev venv may hold both).

The record-batch transcoder likewise: the sidecar's wheel ships the `kafka_sidecar_transcoder`
package (from transcoder/python), whose pure-Python implementation needs no Rust; the wheel
built from transcoder/ (maturin) is only the compiled `kafka_sidecar_transcoder_native`, which
the package uses when it is there. Checked here: both wheels, from the checkout and from the
Dockerfile's context, and a fresh venv taking them in either order and losing either one.

Needs the network (pip fetches hatchling and maturin for the builds and resolves the sidecar's
dependencies from the index) and cargo (the transcoder's wheel, built incrementally in
transcoder/target); about 90 s.
"""

from __future__ import annotations

import email.parser
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from email.message import Message
from pathlib import Path
from typing import Any

import pytest

from kafkasidecar.v1 import consumer_pb2 as pb
from sidecar import __version__
from tests.localkafka import ROOT

CLIENT_SRC = ROOT / "clients" / "python" / "src"
PACKAGE = CLIENT_SRC / "kafkasidecar"
TRANSCODER = ROOT / "transcoder"
TRANSCODER_PACKAGE = TRANSCODER / "python" / "kafka_sidecar_transcoder"
NATIVE = "kafka_sidecar_transcoder_native"

pytestmark = pytest.mark.timeout(600)


def pip(
    *args: str, cwd: Path = ROOT, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, f"pip {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def normalized(name: str) -> str:
    """A distribution name as indexes compare them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def build_wheel(source: Path, out: Path, env: dict[str, str] | None = None) -> Path:
    pip("wheel", "--no-deps", "--quiet", "-w", str(out), str(source), env=env)
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


def sources(package: Path) -> dict[str, bytes]:
    """Every file of a package folder, as a wheel should ship it."""
    return {
        f"{package.name}/{path.relative_to(package).as_posix()}": path.read_bytes()
        for path in package.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    }


def package_sources() -> dict[str, bytes]:
    """Every file of clients/python/src/kafkasidecar, as the wheel should ship it."""
    files = sources(PACKAGE)
    assert "kafkasidecar/v1/consumer_pb2.py" in files
    return files


def shipped(wheel: Path, top: str) -> dict[str, bytes]:
    with zipfile.ZipFile(wheel) as archive:
        return {n: archive.read(n) for n in archive.namelist() if n.startswith(f"{top}/")}


def tops(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as archive:
        return {name.split("/")[0] for name in archive.namelist()}


@pytest.fixture(scope="module")
def sidecar_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_wheel(ROOT, tmp_path_factory.mktemp("wheel"))


@pytest.fixture(scope="module")
def transcoder_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built in place, as `pip install ./transcoder` builds it: cargo reuses transcoder/target."""
    assert shutil.which("cargo"), "cargo not found (Rust is needed for transcoder/)"
    return build_wheel(TRANSCODER, tmp_path_factory.mktemp("transcoder-wheel"))


def files_of(python: Path, *dists: str) -> dict[str, set[str]]:
    """The files each installed distribution owns (its RECORD, less its own dist-info)."""
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    owned = {}
    for dist in dists:
        [info] = site.glob(f"{dist}-*.dist-info")
        rows = (info / "RECORD").read_text(encoding="utf-8").splitlines()
        paths = {row.split(",")[0] for row in rows}
        owned[dist] = {path for path in paths if path and not path.startswith(f"{info.name}/")}
    return owned


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
    # The transcoder's package, pure implementation and loader, exactly as in the checkout.
    transcoder = shipped(sidecar_wheel, "kafka_sidecar_transcoder")
    assert transcoder == sources(TRANSCODER_PACKAGE)
    assert {"kafka_sidecar_transcoder/pure.py", "kafka_sidecar_transcoder/native.py"} <= set(
        transcoder
    )
    assert tops(sidecar_wheel) == {
        "sidecar",
        "kafkasidecar",
        "kafka_sidecar_transcoder",
        f"kafka_sidecar-{__version__}.dist-info",
    }


def test_transcoder_wheel_is_the_compiled_module_alone(transcoder_wheel: Path) -> None:
    meta = metadata(transcoder_wheel)
    assert meta["Name"] == "kafka-sidecar-transcoder"
    assert requirement_names(meta) == set()
    assert tops(transcoder_wheel) == {
        NATIVE,
        f"kafka_sidecar_transcoder-{meta['Version']}.dist-info",
    }
    assert any(name.endswith(".abi3.so") for name in shipped(transcoder_wheel, NATIVE))


def test_dockerfile_context_builds_the_same_wheels(
    sidecar_wheel: Path, transcoder_wheel: Path, tmp_path: Path
) -> None:
    """The builder stage's COPY lines (through .dockerignore's allow-list) are enough for them."""
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
    assert not (context / "transcoder" / "target").exists()
    wheel = build_wheel(context, tmp_path / "out")
    assert shipped(wheel, "kafkasidecar") == shipped(sidecar_wheel, "kafkasidecar")
    assert set(shipped(wheel, "sidecar")) == set(shipped(sidecar_wheel, "sidecar"))
    assert shipped(wheel, "kafka_sidecar_transcoder") == shipped(
        sidecar_wheel, "kafka_sidecar_transcoder"
    )
    # The crate builds from the context too (into the checkout's target folder, where only the
    # crate itself is compiled again).
    env = {**os.environ, "CARGO_TARGET_DIR": str(TRANSCODER / "target")}
    native = build_wheel(context / "transcoder", tmp_path / "out-transcoder", env=env)
    assert set(shipped(native, NATIVE)) == set(shipped(transcoder_wheel, NATIVE))


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
    owned = files_of(python, "kafka_sidecar", "kafka_sidecar_client")
    for files in owned.values():
        # Only path entries (.pth) and scripts: no copy of a package file to go stale.
        assert all(path.endswith(".pth") or path.startswith("../../../bin/") for path in files), (
            files
        )
    assert not owned["kafka_sidecar"] & owned["kafka_sidecar_client"]

    pip(*target, "uninstall", "--quiet", "--yes", "kafka-sidecar-client")
    assert search_path_of(python, "kafkasidecar") == here
    pip(*target, "install", "--quiet", "--no-deps", "-e", client)
    pip(*target, "uninstall", "--quiet", "--yes", "kafka-sidecar")
    assert search_path_of(python, "kafkasidecar") == here  # the client's own, still there
    assert search_path_of(python, "sidecar") == []


# Run in the fresh venv: transcodes a batch of three records from offset 1 and reports what the
# package did, with `kafka_sidecar_transcoder` (or, with "native" as argument, the compiled
# module alone, called directly).
TRANSCODE = """
import json, sys
from aiokafka.record.default_records import DefaultRecordBatchBuilder
builder = DefaultRecordBatchBuilder(2, 0, 0, -1, -1, -1, 1 << 20)
for i in range(3):
    builder.append(i, 1_700_000_000_000 + i, b"k%d" % i, b"v%d" % i, [("h", b"x")])
data = bytes(builder.build())
if sys.argv[1:] == ["native"]:
    import kafka_sidecar_transcoder_native as native
    wire, ends, offsets, sizes, next_offset, batches, error, keys = native.transcode(
        data, "orders", 0, 1, None, True
    )
    print(json.dumps({"wire": wire.hex(), "ends": ends, "offsets": offsets, "error": error}))
    raise SystemExit
import kafka_sidecar_transcoder as t
result = t.transcode(data, "orders", 0, fetch_offset=1, aborted=None)
print(json.dumps({
    "implementation": t.IMPLEMENTATION,
    "wire": result.wire.hex(),
    "ends": result.ends,
    "offsets": result.offsets,
    "next_offset": result.next_offset,
}))
"""


def test_fresh_venv_takes_either_transcoder_in_any_order(
    sidecar_wheel: Path, transcoder_wheel: Path, tmp_path: Path
) -> None:
    """`pip install .` alone: the pure transcoder; with the transcoder's wheel, before or after:
    the compiled one; uninstalling either distribution leaves the other whole."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    target = ("--python", str(python))
    env = {k: v for k, v in os.environ.items() if k != "KAFKA_SIDECAR_TRANSCODER"}

    def transcode(*args: str, **extra: str) -> dict[str, Any]:
        proc = subprocess.run(
            [str(python), "-I", "-c", TRANSCODE, *args],
            cwd=tmp_path,
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        result: dict[str, Any] = json.loads(proc.stdout)
        return result

    def importable(module: str) -> bool:
        proc = subprocess.run(
            [str(python), "-I", "-c", f"import {module}"], cwd=tmp_path, env=env, check=False
        )
        return proc.returncode == 0

    # The sidecar's wheel with its dependencies from the index, as `pip install .` does.
    pip(*target, "install", "--quiet", str(sidecar_wheel), timeout=600)
    version = subprocess.run(
        [str(venv / "bin" / "kafka-sidecar"), "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert version.stdout.strip() == f"kafka-sidecar {__version__}"
    pure = transcode()
    assert pure["implementation"] == "pure"
    assert pure["offsets"] == [1, 2]
    assert pure["next_offset"] == 3
    wire = bytes.fromhex(pure["wire"])
    records = [
        pb.Record.FromString(wire[start:end])
        for start, end in zip([0, *pure["ends"]], pure["ends"], strict=False)
    ]
    assert [(r.topic, r.offset, r.key, r.value) for r in records] == [
        ("orders", 1, b"k1", b"v1"),
        ("orders", 2, b"k2", b"v2"),
    ]

    pip(*target, "install", "--quiet", str(transcoder_wheel))
    native = transcode()
    assert native == {**pure, "implementation": "native"}
    assert transcode(KAFKA_SIDECAR_TRANSCODER="pure") == pure

    owned = files_of(python, "kafka_sidecar", "kafka_sidecar_transcoder")
    assert {path.split("/")[0] for path in owned["kafka_sidecar_transcoder"]} == {NATIVE}
    assert not owned["kafka_sidecar"] & owned["kafka_sidecar_transcoder"]

    # Either one goes: the other stays whole.
    pip(*target, "uninstall", "--quiet", "--yes", "kafka-sidecar-transcoder")
    assert not importable(NATIVE)
    assert transcode() == pure
    pip(*target, "install", "--quiet", str(transcoder_wheel))
    pip(*target, "uninstall", "--quiet", "--yes", "kafka-sidecar")
    assert not importable("kafka_sidecar_transcoder")
    alone = transcode("native")
    assert alone == {"wire": pure["wire"], "ends": pure["ends"], "offsets": [1, 2], "error": None}

    # The other order: the compiled module first, then the sidecar (its dependencies are there).
    pip(*target, "install", "--quiet", "--no-deps", str(sidecar_wheel))
    assert transcode() == native
