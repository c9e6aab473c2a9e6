"""ext_proc streams of the scripted test plugin (:mod:`extsvc.testing.scripted`) for the unit tests,
and helpers to read answers."""

from __future__ import annotations

from typing import Any

from extsvc.extproc.stream import ExtprocStream
from extsvc.plugin.host import PluginHost
from extsvc.testing import ScriptPlugin
from extsvc.testing.extproc import stream_for


def script_host(plugin: ScriptPlugin) -> PluginHost:
    """The built-in plugins plus ``plugin`` as ``script``; no entry points."""
    return PluginHost.create(extra_plugins=[("script", plugin)], load_entry_points=False)


async def scripted_stream(
    plugin: ScriptPlugin, policy_yaml: str, **kwargs: Any
) -> ExtprocStream:
    """A stream whose default policy ``p`` is ``policy_yaml`` (the body of ``policies.p``)."""
    indented = "\n".join("      " + line for line in policy_yaml.strip().splitlines())
    config = f"extproc:\n  default_policy: p\n  policies:\n    p:\n{indented}\n"
    return await stream_for(config, host=script_host(plugin), **kwargs)


def which(response: Any) -> str:
    return str(response.WhichOneof("response"))


def common(response: Any) -> Any:
    return getattr(response, which(response)).response


def set_headers(mutation: Any) -> list[tuple[str, bytes, bool]]:
    """(key, raw_value, append) of each set_headers entry; asserts ``value`` is never used."""
    out = []
    for option in mutation.set_headers:
        assert option.header.value == "", "ext_proc header values must go in raw_value only"
        out.append((option.header.key, option.header.raw_value, option.append.value))
    return out
