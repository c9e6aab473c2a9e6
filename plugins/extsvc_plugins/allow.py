"""``allow``: let every request through."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel, ConfigDict

from extsvc import AuthorizerType, CheckContext, Decision, PluginContext, hookimpl


class AllowConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Allow:
    _DECISION = Decision.allow(reason="allow")

    def __init__(self, config: AllowConfig, ctx: PluginContext) -> None:
        pass

    async def check(self, request: CheckContext, /) -> Decision | None:
        return self._DECISION


@hookimpl
def extsvc_register_authorizers() -> Iterator[AuthorizerType[Any]]:
    yield AuthorizerType(
        name="allow", config_model=AllowConfig, factory=Allow, description="allow every request"
    )
