"""The controller's Kubernetes layer: read the objects the translator needs, write statuses back.

``watch`` (:class:`KubeSource`: list + watch per kind, resume, relist on 410, backoff), ``status``
(:class:`StatusWriter`: status subresource merge-patches, only when changed, only while leading),
``lease`` (:class:`LeaderElector`: one writer among replicas), ``kinds`` (what is read), ``api``
(raw JSON list/watch over lightkube's client), ``backoff`` and ``metrics``.

The translator stays a pure function of a snapshot; nothing here knows how Envoy config is built.
"""

from __future__ import annotations

from .backoff import Backoff
from .kinds import KINDS, Kind
from .lease import LeaderElector
from .metrics import KubeMetrics
from .status import StatusWriter, status_body
from .watch import KubeSource

__all__ = [
    "KINDS",
    "Backoff",
    "Kind",
    "KubeMetrics",
    "KubeSource",
    "LeaderElector",
    "StatusWriter",
    "status_body",
]
