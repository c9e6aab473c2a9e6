"""How long a big policy file takes to load: parse, validate, compile, swap (the reload path).

Generates a file of N ext_authz policies (``header-match`` then ``set-headers``, about 270 bytes
each: 18,600 policies is about 5.7 MB, the size of the attack run's file) and times, in one
process: ``yaml`` parsing, pydantic validation, and the whole ``ConfigLoader.load_text`` (what
the server's reload does), plus the longest stall of the event loop during the load (a ticker
task records the biggest gap between its wake-ups: the admin listener and gRPC health cannot
answer for longer than that).

    .venv/bin/python bench/config_load.py
    .venv/bin/python bench/config_load.py --policies 5000 --profile
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import resource
import time
from pathlib import Path

from extsvc.observability.metrics import Metrics
from extsvc.plugin.host import PluginHost
from extsvc.reload.compile import _load_yaml, gc_paused, parse_and_check
from extsvc.reload.provider import ConfigLoader
from extsvc.reload.runtime import RuntimeHolder

POLICY = """\
  tenant-{i}:
    combine: first-decisive
    steps:
      - plugin: header-match
        config:
          match: {{headers: [{{name: x-tenant, equals: tenant-{i}}}]}}
          on_match: abstain
          on_no_match: deny
      - plugin: set-headers
        config: {{upstream: {{x-tenant-checked: "{i}"}}}}
"""


def document(policies: int) -> str:
    body = "".join(POLICY.format(i=i) for i in range(policies))
    return f"default_policy: tenant-0\npolicies:\n{body}"


async def load(text: str) -> tuple[float, float]:
    """(seconds to load, longest event-loop stall in seconds) of one ``load_text``."""
    host = PluginHost.create(load_entry_points=False)
    # The default cap (max_config_bytes, 4 MiB) would refuse the attack run's 5 MB file.
    loader = ConfigLoader(RuntimeHolder(), host, Metrics(), max_config_bytes=len(text) + 1)
    longest = 0.0
    done = False

    async def ticker() -> None:
        nonlocal longest
        last = time.perf_counter()
        while not done:
            await asyncio.sleep(0.005)
            now = time.perf_counter()
            longest = max(longest, now - last)
            last = now

    tick = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    started = time.perf_counter()
    cpu = time.process_time()
    ok = await loader.load_text(text, source="<bench>", base_dir=Path())
    elapsed = time.perf_counter() - started
    print(f"  load_text (CPU):              {time.process_time() - cpu:6.2f} s")
    done = True
    await tick
    assert ok, "the generated config was rejected"
    return elapsed, longest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policies", type=int, default=18_600)
    parser.add_argument("--profile", action="store_true", help="cProfile the load, top 30")
    args = parser.parse_args()

    text = document(args.policies)
    print(f"{args.policies} policies, {len(text) / 1e6:.2f} MB")
    host = PluginHost.create(load_entry_points=False)
    with gc_paused():  # as the server parses: see compile.gc_paused
        started = time.process_time()
        _load_yaml(text, "<bench>")
        print(f"  yaml (CPU):                   {time.process_time() - started:6.2f} s")
        started = time.process_time()
        parse_and_check(text, host)
        print(f"  yaml + pydantic + plugin configs (CPU): {time.process_time() - started:6.2f} s")
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
    elapsed, stall = asyncio.run(load(text))
    if args.profile:
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
    print(f"  load_text (whole reload):     {elapsed:6.2f} s; longest event-loop stall {stall:.3f} s")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"  peak RSS of this process:     {peak:6.0f} MB")


if __name__ == "__main__":
    main()
