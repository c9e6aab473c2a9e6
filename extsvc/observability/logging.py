"""Log set-up (text or JSON lines) and redaction of credentials.

Request logs carry the request's ``x-request-id`` (``request_id``). Values of credential headers
(authorization, cookies, API keys, and any name configured in ``redact_headers``) are never
written: :func:`redact_headers` is the only way request headers reach a log line.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable, Mapping

SENSITIVE_HEADERS = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "cookie",
        "set-cookie",
        "x-api-key",
        "api-key",
        "apikey",
        "x-auth-token",
    }
)
REDACTED = "<redacted>"
_extra_sensitive: frozenset[str] = frozenset()


def redact_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """A copy of ``headers`` safe to log: credential values replaced by ``<redacted>``."""
    hidden = SENSITIVE_HEADERS | _extra_sensitive
    return {k: (REDACTED if k.lower() in hidden else v) for k, v in headers.items()}


class JsonFormatter(logging.Formatter):
    _STANDARD = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        for key, value in vars(record).items():
            if key not in self._STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(level: str = "INFO", fmt: str = "text", redact: Iterable[str] = ()) -> None:
    global _extra_sensitive
    _extra_sensitive = frozenset(h.lower() for h in redact)
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
