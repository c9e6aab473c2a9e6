"""Process settings: command-line flags over ``EXTSVC_*`` environment variables over defaults."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

ENV_PREFIX = "EXTSVC_"


class Settings(BaseModel):
    """How the process runs (the policy file holds *what* it decides)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    config: Path | None = Field(None, description="policy file; None = the embedded demo config")
    grpc_address: str = "0.0.0.0:9001"
    admin_address: str = "127.0.0.1:9002"
    grace_period_s: float = Field(10.0, ge=0)
    reload_interval_s: float = Field(1.0, gt=0)
    workers: int = Field(1, ge=1, le=256)
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = Field(None, description="set = mTLS: clients must present")
    max_message_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    deadline_margin_ms: float = Field(
        5.0, ge=0, description="time kept back from the RPC deadline to send the answer"
    )
    default_timeout_ms: float = Field(
        1000.0, gt=0, description="step deadline when Envoy sends none"
    )
    event_loop: Literal["auto", "uvloop", "asyncio"] = Field(
        "auto", description="auto = uvloop when installed (it is on Linux and macOS), else asyncio"
    )
    log_level: str = "INFO"
    log_format: Literal["text", "json"] = "text"
    plugins_allow: tuple[str, ...] | None = Field(
        None, description="only these third-party plugins (entry-point names) may load"
    )
    plugins_block: tuple[str, ...] = Field((), description="plugins never loaded (any kind)")
    redact_headers: tuple[str, ...] = Field(
        (), description="more header names whose values are never logged"
    )

    @field_validator("plugins_allow", "plugins_block", "redact_headers", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(p.strip() for p in value.split(",") if p.strip())
        return value

    @classmethod
    def load(
        cls, overrides: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None
    ) -> Settings:
        """Build settings from ``EXTSVC_<FIELD>`` variables, then ``overrides`` (CLI flags)."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for name in cls.model_fields:
            key = ENV_PREFIX + name.upper()
            if key in env and env[key] != "":
                values[name] = env[key]
        for name, value in (overrides or {}).items():
            if value is not None:
                values[name] = value
        settings = cls.model_validate(values)
        if (settings.tls_cert_file is None) != (settings.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file must be set together")
        if settings.tls_client_ca_file is not None and settings.tls_cert_file is None:
            raise ValueError("tls_client_ca_file (mTLS) needs tls_cert_file and tls_key_file")
        return settings
