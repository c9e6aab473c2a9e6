"""docs/observability.md: its decision record is the one written, its settings exist, and its
admin API example runs against a live server."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys

import grpc

from extsvc.observability.decisions import DecisionRecord
from extsvc.settings import ENV_PREFIX, Settings
from extsvc.testing import authz_stub, check_request, running_server

from .test_docs import FENCE, ROOT

DOC = (ROOT / "docs" / "observability.md").read_text(encoding="utf-8")


def _blocks(language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(DOC) if lang == language]


def test_the_example_record_has_the_fields_of_a_real_one() -> None:
    (example,) = [json.loads(b) for b in _blocks("json")]
    real = DecisionRecord(0.0, "ext_authz", "p", "deny").as_dict()
    assert list(example) == list(real)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", example["time"])
    # every field is described in the table
    described = set(re.findall(r"^\| `(\w+)`", DOC, re.MULTILINE))
    assert set(real) | {"detail"} <= described | {"authority", "path", "method", "source"}


def test_every_setting_the_page_names_exists() -> None:
    named = set(re.findall(rf"`{ENV_PREFIX}([A-Z0-9_]+)`", DOC))
    assert named
    assert {n.lower() for n in named} - set(Settings.model_fields) == set()
    ours = {n for n in Settings.model_fields if n.startswith(("decision_", "tracing_"))}
    assert ours <= {n.lower() for n in named}, "a decision log or tracing setting is undocumented"


async def test_the_admin_api_example_runs() -> None:
    (example,) = [b for b in _blocks("python") if "WatchDecisions" in b]
    async with running_server() as server, grpc.aio.insecure_channel(
        f"127.0.0.1:{server.grpc_port}"
    ) as channel:
        answer = await authz_stub(channel).Check(check_request("/admin"))
        assert answer.status.code != 0  # the demo policy denies /admin
        code = example.replace("127.0.0.1:9002", f"127.0.0.1:{server.admin_port}")
        # a process of its own, while this one's loop serves it
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", code, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    policy, reason = out.decode().strip().split(" ", 1)
    assert (policy, reason) == ("demo", "block-admin: matched")
