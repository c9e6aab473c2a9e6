"""The project's exception hierarchy."""

from __future__ import annotations


class ExtsvcError(Exception):
    """Base class of every error extsvc raises on purpose."""


class ConfigError(ExtsvcError):
    """A configuration that cannot be used. ``problems`` lists each one with its field path."""

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))


class PluginError(ExtsvcError):
    """A plugin that cannot be loaded, registered or started."""

    def __init__(self, message: str, *, plugin: str) -> None:
        self.plugin = plugin
        super().__init__(f"plugin {plugin!r}: {message}")


class StoreError(ExtsvcError):
    """A rate-limit store that could not answer (unreachable, timed out, protocol error)."""
