"""The test harness itself: a process it starts is one process, and it is gone after the block."""

from __future__ import annotations

import subprocess

from extsvc.testing.harness import ExtsvcProcess


def _running_with(marker: str) -> int:
    listing = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    return sum(1 for line in listing.splitlines() if marker in line and "extsvc" in line)


def test_entering_a_started_process_does_not_start_a_second_one() -> None:
    server = ExtsvcProcess()
    marker = f"127.0.0.1:{server.grpc_port}"
    with server.start() as same:  # the form that once left an orphan behind
        assert same is server
        assert _running_with(marker) == 1
    assert _running_with(marker) == 0
