"""The ``ratelimit:`` section of the extsvc config: where the domain files are, where counters
live and how the service answers.

It lives on the config floor with the rest of the file's shape (:mod:`extsvc.config.model`);
the domain files themselves (envoyproxy/ratelimit's format) are the rate-limit service's own
input and are parsed in :mod:`extsvc.ratelimit.config`. Paths are relative to the config file's
directory.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class StoreType(StrEnum):
    MEMORY = "memory"
    REDIS = "redis"
    REDIS_CLUSTER = "redis-cluster"
    PLUGIN = "plugin"  # the store named by ``plugin``, registered by a plugin


#: Settings of the Redis stores: with ``type: plugin`` they belong in the plugin's ``config``.
_REDIS_ONLY = (
    "url",
    "urls",
    "password_file",
    "pool",
    "timeout_ms",
    "pipeline_window_us",
    "pipeline_limit",
)


class StoreSettings(_Model):
    """Where counters live. ``memory`` is per process: with ``--workers N`` each worker (and each
    replica) counts alone, so the effective limit is N times the configured one.

    ``type: plugin`` uses the store a plugin registered under the name ``plugin``
    (``extsvc_register_limit_stores``); ``config`` is validated against that store's own model
    when the config is compiled (:mod:`extsvc.reload.compile`), like a policy step's.
    """

    type: StoreType = StoreType.MEMORY
    plugin: str | None = Field(
        None, min_length=1, description="type plugin: the name a plugin registered the store under"
    )
    config: dict[str, Any] = Field(
        default_factory=dict, description="type plugin: the store's settings (its own model)"
    )
    url: str | None = Field(None, description="redis://host:port/db (redis) or one seed node (cluster)")
    urls: list[str] = Field(default_factory=list, description="Redis Cluster seed nodes")
    password_file: Path | None = Field(None, description="file holding the Redis password")
    pool: int = Field(64, ge=1, le=4096, description="connections per Redis node")
    key_prefix: str = ""
    hash_tag: bool = Field(
        False,
        description="wrap the domain in {} so that all keys of a domain share one Cluster slot "
        "(one script call per request on a cluster, at the price of one node per domain)",
    )
    timeout_ms: float = Field(100, gt=0, le=60_000, description="upper bound of one store call")
    pipeline_window_us: int = Field(
        500,
        ge=0,
        le=100_000,
        description="redis: while writes follow each other closer than this, hold a request's "
        "command up to this long so that requests share one write and one read (like "
        "envoyproxy/ratelimit's REDIS_PIPELINE_WINDOW); 0: always send at the next event-loop turn",
    )
    pipeline_limit: int = Field(
        64, ge=1, le=10_000, description="redis: with a window, send once this many are held"
    )

    @model_validator(mode="after")
    def _needs_address(self) -> StoreSettings:
        if self.type is StoreType.PLUGIN:
            if self.plugin is None:
                raise ValueError("store type plugin needs plugin (the store's registered name)")
            misplaced = [name for name in _REDIS_ONLY if name in self.model_fields_set]
            if misplaced:
                raise ValueError(
                    f"{', '.join(misplaced)}: Redis settings; a plugin store's settings go in config"
                )
            return self
        if self.plugin is not None or self.config:
            raise ValueError(f"plugin and config are for type plugin, not {self.type.value}")
        if self.type is not StoreType.MEMORY and not (self.url or self.urls):
            raise ValueError(f"store type {self.type.value} needs url or urls")
        if self.type is StoreType.REDIS and self.urls:
            raise ValueError("urls is for redis-cluster; use url for a single Redis")
        if self.type is not StoreType.REDIS and "pipeline_window_us" in self.model_fields_set:
            raise ValueError("pipeline_window_us applies to type redis only")
        return self


class ResponseHeaders(_Model):
    """envoyproxy/ratelimit's LIMIT_RESPONSE_HEADERS_ENABLED: headers from the descriptor with
    the fewest requests remaining, added to the response (Envoy's own ``x-ratelimit-*`` headers
    need no setting here: they come from the statuses)."""

    enabled: bool = False
    limit: str = "RateLimit-Limit"
    remaining: str = "RateLimit-Remaining"
    reset: str = "RateLimit-Reset"


class OverLimitReply(_Model):
    """Body and headers of the 429 Envoy sends when the answer is OVER_LIMIT."""

    body: str = ""
    headers: dict[str, str] = Field(default_factory=dict)


class RateLimitSection(_Model):
    """The ``ratelimit:`` section. Paths are relative to the config file's directory."""

    config_dir: Path | None = Field(None, description="every *.yaml / *.yml in it is a domain file")
    files: list[Path] = Field(default_factory=list)
    store: StoreSettings = Field(default_factory=StoreSettings)
    failure_mode: Literal["allow", "deny"] = Field(
        "allow", description="the answer when the store fails or is too slow"
    )
    unknown_domain: Literal["ok", "over_limit"] = "ok"
    local_cache: bool = Field(
        False, description="remember fixed-window keys over their limit until the window ends"
    )
    near_limit_ratio: float = Field(0.8, gt=0, le=1)
    shadow_mode: bool = Field(False, description="count everything, never answer OVER_LIMIT")
    max_metric_values: int = Field(
        1000,
        ge=1,
        le=100_000,
        description="distinct `limit` label values per domain taken from requests "
        "(detailed_metric, value_to_metric, Envoy's limit overrides); the next ones are counted "
        "under (other)",
    )
    response_headers: ResponseHeaders = Field(default_factory=ResponseHeaders)
    over_limit: OverLimitReply = Field(default_factory=OverLimitReply)

    @model_validator(mode="after")
    def _has_sources(self) -> RateLimitSection:
        if self.config_dir is None and not self.files:
            raise ValueError("set config_dir or files (where the domain files are)")
        return self
