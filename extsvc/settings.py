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

    config: Path | None = Field(None, description="policy file (unset: the embedded demo config)")
    grpc_address: str = Field(
        "0.0.0.0:9001", description="host:port of the gRPC services (all three, one port)"
    )
    admin_address: str = Field(
        "127.0.0.1:9002", description="host:port of /healthz /readyz /metrics /status"
    )
    admin_max_connections: int = Field(
        64, ge=1, le=10_000, description="admin connections open at once (the oldest idle is cut)"
    )
    admin_request_timeout_s: float = Field(
        5.0, gt=0, le=300, description="seconds an admin client has to send its request"
    )
    grace_period_s: float = Field(
        10.0, ge=0, description="seconds in-flight RPCs get on SIGTERM; then they are cancelled "
        "and the process exits regardless"
    )
    drain_delay_s: float = Field(
        5.0, ge=0, le=300, description="seconds health is NOT_SERVING on SIGTERM before the port "
        "stops accepting (health checks move traffic away first)"
    )
    plugin_start_timeout_s: float = Field(
        10.0, gt=0, le=600, description="seconds a plugin's start() may take; over: the config "
        "is rejected"
    )
    max_config_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, description="largest policy file accepted (bigger: rejected)"
    )
    reflection: bool = Field(True, description="serve gRPC reflection on the gRPC port")
    reload_interval_s: float = Field(1.0, gt=0, description="seconds between config file checks")
    workers: int = Field(1, ge=1, le=256, description="processes sharing the gRPC port")
    tls_cert_file: Path | None = Field(None, description="PEM certificate: serve gRPC over TLS")
    tls_key_file: Path | None = Field(None, description="PEM private key of tls_cert_file")
    tls_client_ca_file: Path | None = Field(
        None, description="CA of client certificates: set, clients must present one (mTLS)"
    )
    max_message_bytes: int = Field(
        16 * 1024 * 1024, ge=1024, description="largest gRPC message received or sent"
    )
    # What one request may carry (docs/hardening.md): over a cap, ext_authz denies (the policy's
    # error_reply) and ext_proc answers 431 (request) / 502 (response).
    max_request_headers: int = Field(
        1000, ge=1, description="headers in one Check or ext_proc header/trailer message"
    )
    max_request_header_bytes: int = Field(
        256 * 1024, ge=1024, description="bytes of header names and values in one of those"
    )
    max_request_body_bytes: int | None = Field(
        None, ge=0, description="body bytes in one Check (unset: max_message_bytes)"
    )
    # Deadlines (docs/hardening.md): the answer must be written before the caller's deadline,
    # so max(deadline_margin_ms, deadline_margin_ratio x the time left) is kept back from the
    # steps (plus the lateness recently seen), but never more than half of the time left.
    deadline_margin_ms: float = Field(
        30.0, ge=0, le=10_000,
        description="least time kept back from the RPC deadline to send the answer",
    )
    deadline_margin_ratio: float = Field(
        0.1, ge=0, le=0.5, description="share of the RPC's time left kept back (if above the least)"
    )
    # Concurrency caps (docs/hardening.md): beyond them new work is refused at once, counted in
    # extsvc_shed_total, before memory runs away.
    max_extproc_streams: int = Field(
        4096, ge=1, description="ext_proc streams open at once; more: RESOURCE_EXHAUSTED"
    )
    max_authz_inflight: int = Field(
        8192, ge=1, description="Checks in progress at once; more: the policy's on_error answer"
    )
    max_streams_per_connection: int = Field(
        1024, ge=1, description="concurrent RPCs on one HTTP/2 connection (grpc.max_concurrent_streams)"
    )
    grpc_handshake_timeout_s: float = Field(
        10.0, gt=0, le=300, description="a gRPC connection that has not finished its HTTP/2 (and "
        "TLS) handshake by then is closed"
    )
    grpc_max_connection_idle_s: float = Field(
        300.0, gt=0, description="a gRPC connection with no RPC for this long is closed (GOAWAY; "
        "Envoy reconnects when it needs to)"
    )
    default_timeout_ms: float = Field(
        1000.0, gt=0, description="step deadline when Envoy sends none"
    )
    event_loop: Literal["auto", "uvloop", "asyncio"] = Field(
        "auto", description="auto = uvloop when installed (it is on Linux and macOS), else asyncio"
    )
    log_level: str = Field("INFO", description="DEBUG, INFO, WARNING or ERROR")
    log_format: Literal["text", "json"] = Field("text", description="text or json (one object a line)")
    plugins_allow: tuple[str, ...] | None = Field(
        None, description="only these third-party plugins (entry-point names) may load"
    )
    plugins_block: tuple[str, ...] = Field((), description="plugins never loaded (any kind)")
    redact_headers: tuple[str, ...] = Field(
        (), description="more header names whose values are never logged"
    )
    # Traffic insights (docs/observability.md)
    decision_log: Literal["off", "default", "all"] = Field(
        "default", description="decisions recorded: default = every ext_authz answer, ext_proc "
        "immediate responses, rate-limit OVER_LIMIT and errors; all = also rate-limit OK and "
        "passed ext_proc streams; off"
    )
    decision_log_output: Literal["stdout", "none"] = Field(
        "stdout", description="stdout = JSON lines on standard output; none = only the live "
        "stream (extsvc tail)"
    )
    decision_log_sample: float = Field(
        1.0, ge=0, le=1, description="share of decision records written to stdout"
    )
    decision_log_max_per_second: int = Field(
        200, ge=0, description="most decision records written to stdout per second per worker "
        "(more: dropped and counted)"
    )
    decision_log_recent: int = Field(
        1000, ge=0, le=100_000, description="decisions kept per worker for readers that attach "
        "later (extsvc tail --last)"
    )
    decision_log_headers: tuple[str, ...] = Field(
        (), description="request headers copied into decision records (values redacted like "
        "logs: credentials and redact_headers never appear)"
    )
    decision_log_descriptor_values: bool = Field(
        False, description="put rate-limit descriptor values in decision records (default: "
        "keys only; values may identify users)"
    )
    decision_stream_max_readers: int = Field(
        16, ge=1, le=1024, description="live decision stream readers at once per worker"
    )
    admin_token_file: Path | None = Field(
        None, description="file holding a token the admin gRPC API (the decision stream) then "
        "requires as 'authorization: Bearer <token>'"
    )
    tracing_endpoint: str | None = Field(
        None, description="OTLP/gRPC collector (http://host:4317 or https://...): set, the "
        "services send OpenTelemetry traces; OTEL_EXPORTER_OTLP_* variables apply"
    )
    tracing_sample_ratio: float = Field(
        1.0, ge=0, le=1, description="share of traces starting here that are sampled (a "
        "caller's sampled flag is followed)"
    )
    tracing_service_name: str = Field("extsvc", description="service.name of the spans")
    tracing_descriptor_values: bool = Field(
        False, description="put rate-limit descriptor values on spans (default: keys only)"
    )

    @classmethod
    def environment_help(cls) -> str:
        """One line per ``EXTSVC_*`` variable: its name, what it sets, its default."""
        lines = []
        for name, field in cls.model_fields.items():
            default = field.default if field.default not in (None, ()) else "-"
            lines.append(
                f"  {ENV_PREFIX}{name.upper():<22} {field.description or ''} (default: {default})"
            )
        return "\n".join(lines)

    @field_validator(
        "plugins_allow", "plugins_block", "redact_headers", "decision_log_headers", mode="before"
    )
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
