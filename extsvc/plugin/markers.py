"""pluggy markers for the ``extsvc`` project name."""

from __future__ import annotations

import pluggy

PROJECT = "extsvc"
#: The entry-point group third-party plugins are found in.
ENTRY_POINT_GROUP = "extsvc"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)
