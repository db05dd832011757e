"""Apps in other languages: the Go and Node example consumers and grpcurl, against a real sidecar.

The toolchain packages are installed from here, as CI needs them: the Go tools with `go install`
from the Go module proxy (scripts/ensure-go), the Node packages with `npm ci`
(scripts/ensure-node). `go`, `node` and `npm` themselves must be on PATH; without them these
tests fail, they do not skip.
"""

from __future__ import annotations

import asyncio
import filecmp
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

import kafkasidecar.client
from tests.clienttools import ensure_go, ensure_node, produce, require, run, wait_committed
from tests.localkafka import ROOT, LocalKafka
from tests.sidecarproc import SidecarProcess, group_subscription

TopicFactory = Callable[..., Awaitable[str]]
StartSidecar = Callable[..., Awaitable[SidecarProcess]]

# On a new machine the first test also installs the toolchain packages (go install, npm ci)
# and builds gRPC for Go: minutes, not the suite's usual per-test limit.
pytestmark = pytest.mark.timeout(900)

GO_MODULE = ROOT / "clients" / "go"
GO_GENERATED = GO_MODULE / "kafkasidecar" / "v1"


@pytest.fixture(scope="session")
def go_bin() -> Path:
    return ensure_go()


@pytest.fixture(scope="session")
def node_dir() -> Path:
    return ensure_node()


@pytest.fixture(scope="session")
def go_consumer(go_bin: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Go example, built (its modules come from the Go module proxy per go.sum)."""
    binary = tmp_path_factory.mktemp("go") / "consumer"
    run([require("go"), "build", "-o", str(binary), "./examples/consumer"], cwd=GO_MODULE)
    return binary


async def run_app(cmd: list[str], timeout: float = 120) -> dict[str, Any]:
    """Runs an example consumer to its end; its last stdout line is a JSON summary."""
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        async with asyncio.timeout(timeout):
            stdout, stderr = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    output = f"{stdout.decode()}\n{stderr.decode()}"
    assert proc.returncode == 0, output
    summary: dict[str, Any] = json.loads(stdout.decode().strip().splitlines()[-1])
    return summary


async def consume_with(
    cmd: Callable[[SidecarProcess, str], list[str]],
    kafka: LocalKafka,
    new_topic: TopicFactory,
    producer: AIOKafkaProducer,
    start_sidecar: StartSidecar,
) -> None:
    """A known set of records, consumed and acked by the app; Kafka's commits must match."""
    topic = await new_topic(partitions=3)
    produced = await produce(producer, topic, 30, partitions=3)
    sub = group_subscription("polyglot", topic, batch={"max_records": 4, "max_wait_ms": 100})
    sidecar = await start_sidecar([sub], listener="plaintext")
    summary = await run_app(cmd(sidecar, "polyglot"))
    assert summary["records"] == len(produced), summary
    assert summary["reason"] == "max-records", summary
    assert summary["rejected"] == 0, summary
    assert summary["last_offsets"] == {f"{topic}[{p}]": 9 for p in range(3)}, summary
    await wait_committed(kafka, sub["group_id"], topic)


async def test_go_example_consumes_acks_and_commits(
    go_consumer: Path,
    kafka: LocalKafka,
    new_topic: TopicFactory,
    producer: AIOKafkaProducer,
    start_sidecar: StartSidecar,
) -> None:
    await consume_with(
        lambda sidecar, sub: [
            str(go_consumer),
            f"-target={sidecar.address}",
            f"-subscription={sub}",
            "-max-records=30",
            "-idle=60s",
        ],
        kafka,
        new_topic,
        producer,
        start_sidecar,
    )


async def test_node_example_consumes_acks_and_commits(
    node_dir: Path,
    kafka: LocalKafka,
    new_topic: TopicFactory,
    producer: AIOKafkaProducer,
    start_sidecar: StartSidecar,
) -> None:
    await consume_with(
        lambda sidecar, sub: [
            require("node"),
            str(node_dir / "consumer.js"),
            f"--target={sidecar.address}",
            f"--subscription={sub}",
            "--max-records=30",
            "--idle=60",
        ],
        kafka,
        new_topic,
        producer,
        start_sidecar,
    )


async def test_grpcurl_lists_the_service_reads_status_and_opens_a_stream_by_reflection(
    go_bin: Path,
    new_topic: TopicFactory,
    producer: AIOKafkaProducer,
    start_sidecar: StartSidecar,
) -> None:
    """The grpcurl commands of docs/clients.md, over the sidecar's Unix socket."""
    topic = await new_topic(partitions=1)
    await produce(producer, topic, 3)
    sub = group_subscription("by-hand", topic, batch={"max_records": 10, "max_wait_ms": 100})
    sidecar = await start_sidecar([sub], listener="plaintext")
    grpcurl = [str(go_bin / "grpcurl"), "-plaintext", "-unix"]

    async def call(*args: str, stdin: str | None = None) -> str:
        proc = await asyncio.create_subprocess_exec(
            *grpcurl,
            *args,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        async with asyncio.timeout(60):
            out, err = await proc.communicate(stdin.encode() if stdin else b"")
        assert proc.returncode == 0, f"{out.decode()}\n{err.decode()}"
        return out.decode()

    services = (await call(str(sidecar.socket), "list")).split()
    assert "kafkasidecar.v1.ConsumerService" in services
    assert "grpc.health.v1.Health" in services

    described = await call(str(sidecar.socket), "describe", "kafkasidecar.v1.ConsumerService")
    assert "rpc Consume ( stream .kafkasidecar.v1.ConsumeRequest )" in described

    status = json.loads(
        await call(
            "-d",
            '{"subscription": "by-hand"}',
            str(sidecar.socket),
            "kafkasidecar.v1.ConsumerService/GetStatus",
        )
    )
    assert [s["name"] for s in status["subscriptions"]] == ["by-hand"]

    # A stream by hand: `open` from stdin; when stdin ends the stream half-closes, and the
    # sidecar takes back any batch it sent (never acked) for the next stream.
    opened = await call(
        "-d",
        "@",
        str(sidecar.socket),
        "kafkasidecar.v1.ConsumerService/Consume",
        stdin='{"open": {"subscription": "by-hand", "client_id": "grpcurl"}}',
    )
    messages = json_stream(opened)
    assert messages[0]["opened"]["group_id"] == sub["group_id"]
    assert messages[0]["opened"]["stream_id"]


def json_stream(text: str) -> list[dict[str, Any]]:
    """grpcurl prints one JSON object per response message, one after the other."""
    decoder = json.JSONDecoder()
    messages: list[dict[str, Any]] = []
    text = text.strip()
    while text:
        message, end = decoder.raw_decode(text)
        messages.append(message)
        text = text[end:].strip()
    return messages


def test_generated_go_is_current(go_bin: Path, tmp_path: Path) -> None:
    """scripts/gen-proto makes the Go code; the checked-in copy must match a fresh run."""
    run(
        [str(ROOT / "scripts" / "gen-proto")],
        OUT_GO=str(tmp_path),
        KAFKA_SIDECAR_GO_BIN=str(go_bin),
        PYTHON=sys.executable,
    )
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert [str(p) for p in fresh] == [
        "kafkasidecar/v1/consumer.pb.go",
        "kafkasidecar/v1/consumer_grpc.pb.go",
    ]
    stale = [str(rel) for rel in fresh if not filecmp.cmp(tmp_path / rel, GO_MODULE / rel)]
    assert not stale, f"generated Go code is stale; run scripts/gen-proto: {stale}"
    checked_in = sorted(p.name for p in GO_GENERATED.iterdir())
    assert checked_in == ["consumer.pb.go", "consumer_grpc.pb.go"]


def test_go_module_is_gofmt_and_vet_clean() -> None:
    assert run([require("gofmt"), "-l", "."], cwd=GO_MODULE) == ""
    run([require("go"), "vet", "./..."], cwd=GO_MODULE)


DOCS = ROOT / "docs" / "clients.md"
DOC_TARGET = "unix:///var/run/kafka-sidecar/sidecar.sock"


def doc_snippet(language: str, subscription: str, target: str) -> str:
    """The first ```language block of docs/clients.md, pointed at a test sidecar."""
    match = re.search(rf"```{language}\n(.*?)```", DOCS.read_text(), re.DOTALL)
    assert match, f"no {language} block in {DOCS}"
    code = match.group(1)
    assert DOC_TARGET in code, code
    assert "orders" in code, code
    return code.replace(DOC_TARGET, target).replace("orders", subscription)


def client_docstring_example(subscription: str, target: str) -> str:
    """The "complete consumer" of the Python client's module docstring, pointed likewise."""
    doc = kafkasidecar.client.__doc__ or ""
    lines: list[str] = []
    for line in doc.split("A complete consumer::\n", 1)[1].splitlines():
        if line and not line.startswith("    "):
            break
        lines.append(line)
    code = textwrap.dedent("\n".join(lines))
    assert DOC_TARGET in code, code
    assert '"receipts"' in code, code
    return code.replace(DOC_TARGET, target).replace('"receipts"', f'"{subscription}"')


async def test_the_consumers_in_docs_clients_md_consume_and_commit(
    go_bin: Path,
    node_dir: Path,
    tmp_path: Path,
    kafka: LocalKafka,
    new_topic: TopicFactory,
    producer: AIOKafkaProducer,
    start_sidecar: StartSidecar,
) -> None:
    languages = ["python", "go", "js", "client-docstring"]
    topics = {lang: await new_topic(partitions=2) for lang in languages}
    for topic in topics.values():
        await produce(producer, topic, 10, partitions=2)
    subs = {
        lang: group_subscription(f"docs-{lang}", topic, batch={"max_wait_ms": 100})
        for lang, topic in topics.items()
    }
    sidecar = await start_sidecar(list(subs.values()), listener="plaintext")

    python = tmp_path / "consumer.py"
    python.write_text(doc_snippet("python", "docs-python", sidecar.address))
    docstring = tmp_path / "docstring.py"
    docstring.write_text(client_docstring_example("docs-client-docstring", sidecar.address))

    # The Go snippet as its own module, using the checked-in client module in place.
    go_dir = tmp_path / "go"
    go_dir.mkdir()
    (go_dir / "main.go").write_text(doc_snippet("go", "docs-go", sidecar.address))
    (go_dir / "go.mod").write_text(
        "module docsconsumer\n\ngo 1.26.0\n\n"
        "require github.com/kafka-sidecar/kafka-sidecar/clients/go v0.0.0\n\n"
        f"replace github.com/kafka-sidecar/kafka-sidecar/clients/go => {GO_MODULE}\n"
    )
    shutil.copy(GO_MODULE / "go.sum", go_dir / "go.sum")
    run([require("go"), "build", "-mod=mod", "-o", "consumer", "."], cwd=go_dir)

    node = tmp_path / "consumer.js"
    node.write_text(
        doc_snippet("js", "docs-js", sidecar.address).replace(
            "includeDirs: ['proto']", f"includeDirs: [{json.dumps(str(ROOT / 'proto'))}]"
        )
    )

    commands = {
        "python": [sys.executable, str(python)],
        "go": [str(go_dir / "consumer")],
        "js": [require("node"), str(node)],
        "client-docstring": [sys.executable, str(docstring)],
    }
    env = {**os.environ, "NODE_PATH": str(node_dir / "node_modules"), "PYTHONUNBUFFERED": "1"}
    procs = {
        lang: await asyncio.create_subprocess_exec(
            *cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        for lang, cmd in commands.items()
    }
    try:
        for lang, sub in subs.items():
            await wait_committed(kafka, sub["group_id"], topics[lang])
        for lang, proc in procs.items():
            assert proc.returncode is None, f"the {lang} consumer exited"
    finally:
        outputs: dict[str, str] = {}
        for lang, proc in procs.items():
            if proc.returncode is None:
                proc.terminate()
            printed, _ = await proc.communicate()
            outputs[lang] = printed.decode()
    for lang, output in outputs.items():
        if lang == "client-docstring":
            # Prints just the values.
            assert sorted(re.findall(r"b'r-(\d+)'", output)) == [f"{i:05d}" for i in range(10)]
            continue
        # Each printed what it consumed: 10 records, as topic[partition]@offset.
        consumed = set(re.findall(rf"{topics[lang]}\[(\d+)\]@(\d+)", output))
        assert consumed == {(str(i % 2), str(i // 2)) for i in range(10)}, f"{lang}:\n{output}"
