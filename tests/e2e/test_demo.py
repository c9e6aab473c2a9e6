"""`extsvc demo` as a new user runs it: the README's curl lines, a line per request, Ctrl-C.

One demo process serves the module; the last test stops it with SIGINT.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from extsvc.testing.harness import free_port, wait_until

pytestmark = pytest.mark.envoy


@dataclass
class Demo:
    proc: subprocess.Popen[str]
    port: int
    lines: list[str] = field(default_factory=list)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def output(self) -> str:
        return "\n".join(self.lines)

    def read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for_line(self, *parts: str, timeout: float = 10.0) -> str:
        found: list[str] = []

        def seen() -> bool:
            found[:] = [line for line in list(self.lines) if all(p in line for p in parts)]
            return bool(found)

        try:
            wait_until(seen, timeout, f"a line with {parts}")
        except TimeoutError:
            pytest.fail(f"no line with {parts} in the demo's output:\n{self.output()}")
        return found[0]


def _descendants(pid: int) -> dict[int, str]:
    """The processes below ``pid`` (Linux /proc): pid -> command line."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out: dict[int, str] = {}
    todo = list(children.get(pid, []))
    while todo:
        child = todo.pop()
        try:
            out[child] = (Path("/proc") / str(child) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        todo.extend(children.get(child, []))
    return out


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture(scope="module")
def demo() -> Iterator[Demo]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "extsvc", "demo", "--port", str(port)],  # other ports: any free one
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    running = Demo(proc, port)
    threading.Thread(target=running.read, daemon=True).start()
    try:
        wait_until(lambda: any("ready" in line for line in running.lines) or proc.poll() is not None,
                   30, "the demo's ready line")
        if proc.poll() is not None:
            time.sleep(0.2)  # the reader catches up with the last lines
            pytest.fail(f"extsvc demo exited {proc.returncode}:\n{running.output()}")
        yield running
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_ready_output_has_the_curl_lines(demo: Demo) -> None:
    text = demo.output()
    for line in (
        f"curl -i localhost:{demo.port}/public/",
        f"curl -i localhost:{demo.port}/admin",
        f"curl -i localhost:{demo.port}/ ",
        f"curl -i -H 'x-demo-user: ann' localhost:{demo.port}/",
        f"-H 'x-demo-user: bob' localhost:{demo.port}/; done",
    ):
        assert line in text, text


@pytest.mark.parametrize(
    ("path", "headers", "status"),
    [
        ("/public/", {}, 200),
        ("/admin", {}, 403),
        ("/", {}, 401),
    ],
)
def test_curl_lines_answer(demo: Demo, path: str, headers: dict[str, str], status: int) -> None:
    assert httpx.get(demo.url(path), headers=headers).status_code == status


def test_a_demo_user_passes_and_is_processed(demo: Demo) -> None:
    response = httpx.get(demo.url("/"), headers={"x-demo-user": "ann"})
    assert response.status_code == 200
    assert response.headers["x-extsvc-processed"] == "true"


def test_rate_limit_loop_ends_in_429(demo: Demo) -> None:
    # The README's loop. 5 a minute per user as a token bucket (extsvc/default_ratelimit.yaml):
    # a fresh user has 5 and gets one back every 12 s, so six requests sent within 12 s are five
    # 200s and a 429 wherever the clock is (a fixed window could restart between two of them).
    user = {"x-demo-user": f"bob-{uuid.uuid4().hex[:8]}"}
    started = time.monotonic()
    statuses = [httpx.get(demo.url("/"), headers=user).status_code for _ in range(6)]
    assert time.monotonic() - started < 12
    assert statuses == [200, 200, 200, 200, 200, 429]


def test_each_request_prints_a_decision_line(demo: Demo) -> None:
    user = f"line-{uuid.uuid4().hex[:8]}"
    assert httpx.get(demo.url("/"), headers={"x-demo-user": user}).status_code == 200
    line = demo.wait_for_line(f"x-demo-user: {user}")
    assert "GET /" in line and "-> 200" in line, line
    assert "authz: allow (policy demo" in line, line
    assert "rate limit: 4 left of 5" in line, line

    assert httpx.get(demo.url("/admin")).status_code == 403
    line = demo.wait_for_line("GET /admin", "-> 403")
    assert "authz: deny 403 (policy demo, step block-admin)" in line, line


def test_sigint_stops_everything(demo: Demo) -> None:
    children = _descendants(demo.proc.pid)
    assert any("envoy" in cmd for cmd in children.values()), children
    assert any("extsvc serve" in cmd for cmd in children.values()), children
    demo.proc.send_signal(signal.SIGINT)
    assert demo.proc.wait(10) == 0, demo.output()
    left = {pid: cmd for pid, cmd in children.items() if _alive(pid)}
    assert not left, left
    time.sleep(0.2)  # the reader catches up with the last lines
    assert "Traceback" not in demo.output(), demo.output()
    assert demo.lines[-1] == "extsvc demo: stopped", demo.output()
