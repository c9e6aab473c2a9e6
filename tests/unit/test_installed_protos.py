"""The venv's generated-protobuf modules: who owns the paths several wheels ship, and that both
sides import.

xds-protos bundles copies of ``opentelemetry/proto``, ``google/api`` and ``google/rpc``, the
same module paths as opentelemetry-proto and googleapis-common-protos. Whichever wheel pip writes
last wins, and pip does not promise an order: an older xds-protos copy once broke the OTLP
exporter's import. scripts/_venv.sh and the Containerfile install the owners named in
scripts/shared-paths again, last; these tests check the result in the venv they run in.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _owners() -> list[str]:
    lines = (ROOT / "scripts" / "shared-paths").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _python_files(dist: importlib.metadata.Distribution) -> dict[str, str]:
    """The dist's .py files (path -> RECORD hash), outside its own metadata."""
    out = {}
    for file in dist.files or ():
        if file.suffix == ".py" and file.hash is not None and ".dist-info" not in str(file):
            out[str(file)] = file.hash.value
    return out


def _on_disk(dist: importlib.metadata.Distribution, path: str) -> str:
    data = Path(str(dist.locate_file(path))).read_bytes()
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def test_every_file_two_wheels_ship_is_the_owners_copy() -> None:
    xds = importlib.metadata.distribution("xds-protos")
    xds_files = _python_files(xds)
    shared_total = 0
    for owner_name in _owners():
        try:
            owner = importlib.metadata.distribution(owner_name)
        except importlib.metadata.PackageNotFoundError:  # not in this venv's lock
            continue
        owned = _python_files(owner)
        shared = sorted(set(owned) & set(xds_files))
        assert shared, f"{owner_name} shares no file with xds-protos any more: drop it from " \
                       "scripts/shared-paths"
        wrong = [p for p in shared if _on_disk(owner, p) != owned[p]]
        assert not wrong, f"xds-protos' copy won over {owner_name}'s: {wrong[:5]}"
        shared_total += len(shared)
    assert shared_total > 10


def test_no_other_wheels_ship_the_same_module() -> None:
    """A new overlap (a dependency added later) must be decided, not left to pip's order."""
    by_path: dict[str, list[str]] = defaultdict(list)
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"].lower()
        for path in _python_files(dist):
            by_path[path].append(name)
    allowed = {"xds-protos", *_owners()}
    clashes = {p: sorted(set(names)) for p, names in by_path.items() if len(set(names)) > 1}
    unexpected = {p: n for p, n in clashes.items() if not set(n) <= allowed}
    assert not unexpected, sorted(unexpected.items())[:5]


def test_the_otlp_exporter_and_the_envoy_protos_import_side_by_side() -> None:
    code = (
        "from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter\n"
        "from opentelemetry.proto.trace.v1 import trace_pb2\n"
        "from opentelemetry.proto.collector.trace.v1 import trace_service_pb2\n"
        "from envoy.service.auth.v3 import external_auth_pb2\n"
        "from envoy.service.ext_proc.v3 import external_processor_pb2\n"
        "from envoy.service.ratelimit.v3 import rls_pb2\n"
        "from envoy.extensions.access_loggers.open_telemetry.v3 import logs_service_pb2\n"
        "from google.rpc import status_pb2\n"
        "assert 'flags' in trace_pb2.Span.DESCRIPTOR.fields_by_name\n"
        "assert 'partial_success' in "
        "trace_service_pb2.ExportTraceServiceResponse.DESCRIPTOR.fields_by_name\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.stdout.strip() == "ok", result.stderr
