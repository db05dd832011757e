"""The API's .proto is lint-clean and the code generated from it is current."""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys
from pathlib import Path

from tests.localkafka import ROOT

GENERATED = ROOT / "clients" / "python" / "src"
BIN = Path(sys.executable).parent


def test_proto_is_buf_standard_lint_clean() -> None:
    result = subprocess.run(
        [str(BIN / "buf"), "lint"], cwd=ROOT / "proto", capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_generated_python_is_current(tmp_path: Path) -> None:
    subprocess.run(
        [str(ROOT / "scripts" / "gen-proto")],
        check=True,
        env={**os.environ, "OUT_PY": str(tmp_path), "PYTHON": sys.executable},
    )
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert fresh, "gen-proto produced nothing"
    stale = [
        str(rel)
        for rel in fresh
        if not (GENERATED / rel).exists() or not filecmp.cmp(tmp_path / rel, GENERATED / rel)
    ]
    assert not stale, f"generated code is stale; run scripts/gen-proto: {stale}"


def test_stubs_import_as_documented() -> None:
    from kafkasidecar.v1 import consumer_pb2, consumer_pb2_grpc

    assert consumer_pb2.DESCRIPTOR.package == "kafkasidecar.v1"
    assert hasattr(consumer_pb2_grpc, "ConsumerServiceStub")
