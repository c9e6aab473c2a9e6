"""What one build keeps for the next: Envoy routes, their proto-JSON and their xds-protos messages,
reused when their inputs are the very same objects.

At 1,000 HTTPRoutes most of a rebuild was building the same 2,000 Envoy routes again, writing
them out and parsing them back. The live controller parses only the manifests that changed (the
others keep their parsed objects), so an unchanged route has the same route object, rule and
policy objects as last time: keyed by those objects' ids (the entries hold the objects, so an id
cannot be reused while its entry lives), the previous build's output is still right. An entry not
used by a build is dropped after it, so the memo holds at most two builds' worth.

``render`` passes no memo: every object is built, as before.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any


class Memo:
    """One kind of value, for this build and the previous one."""

    __slots__ = ("_current", "_previous", "hits", "misses")

    def __init__(self) -> None:
        self._previous: dict[Hashable, Any] = {}
        self._current: dict[Hashable, Any] = {}
        self.hits = self.misses = 0

    def get(self, key: Hashable) -> Any:
        found = self._current.get(key)
        if found is None:
            found = self._previous.get(key)
            if found is None:
                self.misses += 1
                return None
            self._current[key] = found
        self.hits += 1
        return found

    def put(self, key: Hashable, value: Any) -> None:
        self._current[key] = value

    def next_build(self) -> None:
        self._previous, self._current = self._current, {}
        self.hits = self.misses = 0


class BuildMemo:
    """The memos of one live controller: ``routes`` (translate), ``dicts`` (proto-JSON of those
    routes), ``messages`` (their xds-protos messages)."""

    def __init__(self) -> None:
        self.routes = Memo()
        self.dicts = Memo()
        self.messages = Memo()

    def next_build(self) -> None:
        for memo in (self.routes, self.dicts, self.messages):
            memo.next_build()
