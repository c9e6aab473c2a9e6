"""The configuration file's schema: what an operator writes and what `extsvc validate` checks.

Everything here is validated once, at load time. Plugin ``config`` blocks are kept as plain
mappings by this model and validated against the plugin's own pydantic model when the policy is
compiled (:mod:`extsvc.reload.compile`), so an unknown plugin or a bad plugin field is reported
with its full path (``policies.demo.steps[1].config.status``).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from extsvc.config.ratelimit import RateLimitSection
from extsvc.types import HeaderName, HeaderValue

#: The ``context_extensions`` key that selects a policy (kgateway's
#: ``TrafficPolicy.extAuth.contextExtensions`` arrives there).
POLICY_CONTEXT_KEY = "extsvc-policy"


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Combine(StrEnum):
    """How the answers of a policy's steps become one decision.

    ``first-decisive``: steps run in order; the first step that allows or denies decides, a step
    that abstains hands over to the next one. ``all-must-allow``: every step that answers must
    allow (any deny decides at once), at least one must allow, and the mutations of all allowing
    steps are merged in order. ``any-allow``: the first allow decides; if no step allows, the first
    deny is the answer (so "jwt OR api-key" returns the JWT step's 401 when both fail).
    """

    FIRST_DECISIVE = "first-decisive"
    ALL_MUST_ALLOW = "all-must-allow"
    ANY_ALLOW = "any-allow"


class OnError(StrEnum):
    """What a policy answers when a step raises or overruns the deadline.

    ``deny`` answers with the policy's ``error_reply``; ``allow`` lets the request through (and
    says so in the log and the metrics); ``envoy`` answers with an ``error_response`` so that
    Envoy's own ``failure_mode_allow`` / ``status_on_error`` decide.
    """

    DENY = "deny"
    ALLOW = "allow"
    ENVOY = "envoy"


class Reply(_Model):
    """A local reply Envoy sends to the client instead of forwarding the request."""

    status: int = Field(403, ge=200, le=599, description="HTTP status of the reply")
    body: str = ""
    headers: dict[HeaderName, HeaderValue] = Field(default_factory=dict)


class Step(_Model):
    """One step of an authorization policy: a plugin kind and its configuration."""

    plugin: str = Field(min_length=1, description="the plugin kind, e.g. header-match")
    name: str | None = Field(None, description="a label for logs; defaults to the plugin kind")
    config: dict[str, Any] = Field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.name or self.plugin


class AuthzPolicy(_Model):
    """A named ext_authz policy: an ordered list of steps and how to combine their answers."""

    steps: list[Step] = Field(min_length=1)
    combine: Combine = Combine.FIRST_DECISIVE
    on_error: OnError = OnError.DENY
    default_reply: Reply = Field(
        default_factory=lambda: Reply(status=403, body=""),
        description="the denial sent when no step decides",
    )
    error_reply: Reply = Field(
        default_factory=lambda: Reply(status=503, body=""),
        description="the denial sent when a step fails and on_error is deny",
    )
    timeout_ms: int | None = Field(
        None,
        ge=1,
        le=60_000,
        description="upper bound for the whole policy; the RPC deadline applies too",
    )


class ExtprocOnError(StrEnum):
    """What an ext_proc policy does when a processor raises or overruns ``timeout_ms``.

    ``fail`` answers the message with an immediate response (``error_status``, 500 by default);
    ``continue`` drops the failing processor's changes to that message and goes on.
    """

    FAIL = "fail"
    CONTINUE = "continue"


class ProcessorStep(_Model):
    """One processor of an ext_proc policy: a processor kind and its configuration."""

    plugin: str = Field(min_length=1, description="the processor kind, e.g. headers")
    name: str | None = Field(None, description="a label for logs; defaults to the plugin kind")
    config: dict[str, Any] = Field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.name or self.plugin


class ExtprocPolicy(_Model):
    """A named ext_proc policy: processors run in order on every message of a stream."""

    processors: list[ProcessorStep] = Field(default_factory=list)
    on_error: ExtprocOnError = ExtprocOnError.FAIL
    error_status: int = Field(500, ge=200, le=599, description="status of the on_error reply")
    timeout_ms: int = Field(
        150,
        ge=1,
        le=60_000,
        description="budget for all processors on one message; keep it under Envoy's "
        "message_timeout (200 ms by default), which answers 504 when it expires",
    )
    mode_override: bool = Field(
        True,
        description="answer the first headers message with a mode_override that switches off "
        "the phases no processor needs (Envoy applies it with allow_mode_override: true)",
    )


class MetadataKey(_Model):
    """A key in the forwarded ``metadata_context`` (``metadata_options.forwarding_namespaces``)."""

    namespace: str = Field(min_length=1)
    key: str = Field(min_length=1)


class Unselected(StrEnum):
    """What an ext_proc stream that chooses no policy (and finds no ``default_policy``) gets.

    ``pass-through`` answers every message unchanged (with a ``mode_override`` that switches
    the remaining phases off, where Envoy allows it); ``reject`` answers an immediate 500.
    A stream that *names* a policy that does not exist is always answered 500.
    """

    PASS_THROUGH = "pass-through"  # noqa: S105 (a mode, not a password)
    REJECT = "reject"


class ExtprocConfig(_Model):
    """The ``extproc:`` section: ext_proc policies and how a stream chooses one.

    A stream's policy is the gRPC call's ``:authority`` (through ``authority_policies`` or a
    policy of that name), then ``policy_attribute``, ``policy_metadata``, ``policy_header`` (in
    this order, each only if configured and present), then ``default_policy``; a stream that
    chooses none is handled per ``unselected``.
    """

    default_policy: str | None = None
    authority_policies: dict[str, str] = Field(default_factory=dict)
    policy_attribute: str | None = Field(
        None, description="a request attribute (Envoy's request_attributes) naming the policy"
    )
    policy_metadata: MetadataKey | None = Field(
        None, description="a forwarded metadata_context key naming the policy"
    )
    policy_header: HeaderName | None = Field(
        None,
        description="a request header naming the policy; only with policy_header_trusted: true "
        "(Envoy removes the client's header and sets its own before ext_proc)",
    )
    policy_header_trusted: bool = Field(
        False,
        description="states that Envoy strips policy_header from client requests and sets it "
        "itself: without it a client could pick a policy without the redaction or limits",
    )
    policies: dict[str, ExtprocPolicy] = Field(default_factory=dict)
    unselected: Unselected = Field(
        Unselected.PASS_THROUGH,
        description="streams that choose no policy: pass-through (unchanged) or reject (500)",
    )

    def selection_notes(self) -> list[str]:
        """What happens to streams that choose no policy, said once at load and by validate."""
        if self.default_policy is not None:
            return []
        if self.unselected is Unselected.REJECT:
            return ["extproc: no default_policy: streams that choose no policy are answered 500 "
                    "(unselected: reject)"]
        if not self.policies:
            return ["extproc: no policies: ext_proc streams pass through unprocessed"]
        return [
            f"extproc: no default_policy: streams that choose none of the {len(self.policies)} "
            "policies pass through unprocessed (set extproc.default_policy, or extproc.unselected: "
            "reject to answer them 500)"
        ]

    @model_validator(mode="after")
    def _references_exist(self) -> ExtprocConfig:
        if self.default_policy is not None and self.default_policy not in self.policies:
            raise ValueError(
                f"default_policy: {self.default_policy!r} is not one of extproc.policies "
                f"({', '.join(sorted(self.policies)) or 'none defined'})"
            )
        for authority, policy in self.authority_policies.items():
            if policy not in self.policies:
                raise ValueError(
                    f"authority_policies.{authority}: {policy!r} is not one of extproc.policies"
                )
        if self.policy_header is not None and not self.policy_header_trusted:
            # A request header is the client's to set: choosing the policy by it would let a
            # client pick one without the redaction or limits its route is meant to get.
            raise ValueError(
                f"policy_header: {self.policy_header!r} would let a client choose the ext_proc "
                "policy (and so skip a redacting or limiting one) by sending that header. Choose "
                "the policy in Envoy instead (authority_policies with the route's "
                "grpc_initial_metadata, policy_attribute or policy_metadata), or, if Envoy removes "
                "the client's header and sets its own before the ext_proc filter, say so with "
                "extproc.policy_header_trusted: true"
            )
        return self


class ExtsvcConfig(_Model):
    """The whole configuration file."""

    version: int = Field(1, ge=1, le=1)
    default_policy: str | None = Field(
        None, description="the policy used when neither context_extensions nor authority choose"
    )
    authority_policies: dict[str, str] = Field(
        default_factory=dict,
        description="map of gRPC :authority -> policy name, for authorities that are not "
        "policy names themselves",
    )
    policies: dict[str, AuthzPolicy] = Field(default_factory=dict)
    extproc: ExtprocConfig = Field(
        default_factory=ExtprocConfig, description="ext_proc policies (see docs/extproc.md)"
    )
    ratelimit: RateLimitSection | None = Field(
        None, description="the rate-limit service: domain files, store, modes (docs/ratelimit.md)"
    )

    @model_validator(mode="after")
    def _references_exist(self) -> ExtsvcConfig:
        if self.default_policy is not None and self.default_policy not in self.policies:
            raise ValueError(
                f"default_policy: {self.default_policy!r} is not one of policies "
                f"({', '.join(sorted(self.policies)) or 'none defined'})"
            )
        for authority, policy in self.authority_policies.items():
            if policy not in self.policies:
                raise ValueError(
                    f"authority_policies.{authority}: {policy!r} is not one of policies"
                )
        return self

    def notes(self) -> list[str]:
        """Choices of this file a reader may not expect, said at every load and by validate."""
        notes = []
        if self.default_policy is None:
            if self.policies:
                notes.append(
                    "ext_authz: no default_policy: a request whose route names no policy (and "
                    "whose authority matches none) is denied 403"
                )
            else:
                notes.append("ext_authz: no policies: every Check is denied 403")
        return notes + self.extproc.selection_notes()

