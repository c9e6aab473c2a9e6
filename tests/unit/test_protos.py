"""The committed code of the project's own APIs (proto/) is what scripts/protos generates."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_generated_admin_api_code_is_current(tmp_path: Path) -> None:
    protos = sorted(p.relative_to(ROOT / "proto") for p in (ROOT / "proto").rglob("*.proto"))
    assert protos
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-Iproto", f"--python_out={tmp_path}",
         f"--grpc_python_out={tmp_path}", *map(str, protos)],
        cwd=ROOT, check=True, capture_output=True, timeout=120,
    )
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.py"))
    assert generated
    stale = [str(p) for p in generated if (ROOT / p).read_bytes() != (tmp_path / p).read_bytes()]
    assert not stale, f"run scripts/protos: {stale} differ from what proto/ generates"


def test_the_admin_api_is_the_one_the_proto_describes() -> None:
    from extsvc.admin.v1 import admin_pb2

    service = admin_pb2.DESCRIPTOR.services_by_name["Admin"]
    assert service.full_name == "extsvc.admin.v1.Admin"
    method = service.methods_by_name["WatchDecisions"]
    assert method.server_streaming and not method.client_streaming
