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


def test_json_lines_stops_at_the_count_or_the_timeout_never_blocking_past_it() -> None:
    import subprocess
    import sys
    import time

    from extsvc.testing.harness import json_lines

    code = "import sys, time; print('{\"a\": 1}'); print('not json'); print('{\"a\": 2}'); " \
           "sys.stdout.flush(); time.sleep(30)"
    for count, expected, at_most_s in ((1, [{"a": 1}], 5.0), (5, [{"a": 1}, {"a": 2}], 5.0)):
        child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout is not None
            started = time.monotonic()
            assert json_lines(child.stdout, count, timeout=1.0) == expected
            assert time.monotonic() - started < at_most_s  # not the child's 30 s
        finally:
            child.kill()
            child.wait()
