"""Where snapshots come from: manifest files (``files``); a Kubernetes watch comes later."""

from __future__ import annotations

__all__: list[str] = []
