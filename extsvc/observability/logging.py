"""Log set-up (text or JSON lines) and redaction of credentials.

Request logs carry the request's ``x-request-id`` (``request_id``). Values of credential headers
(authorization, cookies, API keys, and any name configured in ``redact_headers``) are never
written: :func:`redact_headers` is the only way request headers reach a log line.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime

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
    """A copy of ``headers`` safe to log: credential values replaced by ``<redacted>``, and the
    query string of ``:path`` too (``?access_token=...``, ``?api_key=...`` carry credentials)."""
    hidden = SENSITIVE_HEADERS | _extra_sensitive
    out = {}
    for name, value in headers.items():
        lower = name.lower()
        if lower in hidden:
            value = REDACTED
        elif lower == ":path" and "?" in value:
            value = value.split("?", 1)[0] + "?" + REDACTED
        out[name] = value
    return out


class JsonFormatter(logging.Formatter):
    _STANDARD = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            # ISO 8601, UTC, milliseconds (as the decision log's records)
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")[:-6]
            + "Z",
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
    # DEBUG is for extsvc's own lines: the libraries' debug output (grpc logs a line per call,
    # passlib one per hash scheme) would bury them.
    quiet = max(root.level, logging.INFO)
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(quiet)


#: Loggers held at INFO when extsvc logs at DEBUG.
QUIET_LIBRARIES = ("grpc", "passlib", "asyncio", "httpx", "httpcore", "opentelemetry", "urllib3")


class LogThrottle:
    """Lets one log record per key through per ``interval_s``, counting the ones held back.

    For warnings that a failure repeats on every request (no config yet, a store down, an unknown
    policy): the metric counts every occurrence, the log says it once per interval and how many
    were held back, so a Redis outage at 5,000 RPC/s is not 5,000 log lines a second.

    Usage::

        held = throttle.allow("store-down")
        if held is not None:
            log.warning("store down (%d more since the last report)", held)
    """

    def __init__(self, interval_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._interval = interval_s
        self._clock = clock
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def allow(self, key: str) -> int | None:
        """None when this record is held back, else how many were held back before it."""
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self._interval:
            self._held[key] = self._held.get(key, 0) + 1
            return None
        if len(self._last) > 1024:  # keys can come from requests: bound the memory
            self._last.clear()
            self._held.clear()
        self._last[key] = now
        return self._held.pop(key, 0)
