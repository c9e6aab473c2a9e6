"""Real redis-server processes on free loopback ports (never the system one on 6379)."""

from __future__ import annotations

import contextlib
import random
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from extsvc.testing.harness import free_port


def _cli(port: int, *args: str, timeout: float = 5.0) -> str:
    done = subprocess.run(
        ["redis-cli", "-h", "127.0.0.1", "-p", str(port), *args],
        capture_output=True, text=True, timeout=timeout, check=False,
    )
    return done.stdout.strip()


class RedisServer:
    """One ``redis-server`` without persistence; ``stop()`` kills it, ``start()`` brings it back
    on the same port."""

    def __init__(self, port: int | None = None, *, cluster: bool = False) -> None:
        self.port = port or free_port()
        self.cluster = cluster
        self.dir = Path(tempfile.mkdtemp(prefix=f"extsvc-redis-{self.port}-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        argv = [
            "redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(self.dir), "--protected-mode", "no",
        ]
        if self.cluster:
            argv += ["--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{self.port}.conf",
                     "--cluster-node-timeout", "2000"]
        log = open(self.dir / "redis.log", "ab")  # noqa: SIM115 (kept by the child)
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = (self.dir / "redis.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server on {self.port} exited with {self.proc.returncode}\n{tail}")
            if _cli(self.port, "ping") == "PONG":
                return self
            time.sleep(0.02)
        raise TimeoutError(f"redis-server on {self.port} did not answer PING")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(5)

    def cli(self, *args: str) -> str:
        return _cli(self.port, *args)

    def commandstats(self) -> dict[str, int]:
        """``INFO commandstats``: calls per command (lower-case)."""
        out: dict[str, int] = {}
        for line in self.cli("info", "commandstats").splitlines():
            if line.startswith("cmdstat_"):
                name, _, rest = line.partition(":")
                calls = dict(p.split("=", 1) for p in rest.split(","))["calls"]
                out[name.removeprefix("cmdstat_")] = int(calls)
        return out

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _cluster_port(taken: set[int]) -> int:
    """A free port <= 55535 whose cluster bus port (+10000) is free too."""
    rng = random.SystemRandom()
    while True:
        port = rng.randint(20000, 55535)
        if port not in taken and _port_free(port) and _port_free(port + 10000):
            return port


class RedisCluster:
    """Three masters, no replicas, slots spread by ``redis-cli --cluster create``."""

    def __init__(self) -> None:
        ports: set[int] = set()
        while len(ports) < 3:
            ports.add(_cluster_port(ports))
        self.nodes = [RedisServer(port, cluster=True) for port in sorted(ports)]

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    def start(self, timeout: float = 20.0) -> RedisCluster:
        for node in self.nodes:
            node.start()
        addresses = [f"127.0.0.1:{n.port}" for n in self.nodes]
        done = subprocess.run(
            ["redis-cli", "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True, text=True, timeout=timeout, check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"cluster create failed: {done.stdout}\n{done.stderr}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all("cluster_state:ok" in n.cli("cluster", "info") for n in self.nodes):
                return self
            time.sleep(0.05)
        raise TimeoutError("redis cluster not ok")

    def close(self) -> None:
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.close()
