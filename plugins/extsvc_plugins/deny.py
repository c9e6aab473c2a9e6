"""``deny``: refuse every request with a fixed reply."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from extsvc import (
    AuthorizerType,
    CheckContext,
    Decision,
    HeaderName,
    HeaderValue,
    PluginContext,
    hookimpl,
)


class DenyConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    status: int = Field(403, ge=200, le=599)
    body: str = ""
    headers: dict[HeaderName, HeaderValue] = Field(default_factory=dict)


class Deny:
    def __init__(self, config: DenyConfig, ctx: PluginContext) -> None:
        self._decision = Decision.deny(
            config.status, config.body, config.headers, reason="deny step"
        )

    async def check(self, request: CheckContext, /) -> Decision | None:
        return self._decision


@hookimpl
def extsvc_register_authorizers() -> Iterator[AuthorizerType[Any]]:
    yield AuthorizerType(
        name="deny", config_model=DenyConfig, factory=Deny,
        description="deny every request with a fixed status, body and headers",
    )
