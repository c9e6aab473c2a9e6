"""``api-key``: allow requests that present a known API key.

Keys live in a mounted file (a Secret) and are held in memory only as SHA-256 hashes; a lookup is
one hash and one dict access. The file is re-read when it changes. Formats, by extension:

* ``.json`` / ``.yaml`` / ``.yml``: ``{"keys": [{"key": "...", "client_id": "...", "tenant": "...",
  "labels": {...}}]}``; an entry may give ``sha256: <hex>`` instead of ``key`` so that the Secret
  itself holds no usable key;
* anything else: one key per line, optionally followed by whitespace and a client id and a tenant;
  blank lines and ``#`` comments are skipped.

Example::

    - plugin: api-key
      config:
        keys_file: /etc/extsvc/api-keys/keys.json
        sources: [{header: x-api-key}]
        forward:
          headers: {x-client-id: client_id}
          metadata: {client_id: client_id, tenant: tenant}
        remove_credential: true
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from extsvc import AuthorizerType, CheckContext, Decision, PluginContext, hookimpl
from extsvc.credentials import (
    CredentialSource,
    Forward,
    WatchedFile,
    credential_hash,
    find_credential,
    removal,
)

_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class ApiKeyConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    keys_file: str
    sources: list[CredentialSource] = Field(
        default_factory=lambda: [CredentialSource(header="x-api-key")], min_length=1
    )
    forward: Forward = Field(default_factory=lambda: Forward(metadata={"client_id": "client_id"}))
    remove_credential: bool = False
    reload_interval_s: float = Field(5.0, ge=0)
    on_missing: Literal["deny", "abstain"] = "deny"
    realm: str = "extsvc"


KeyTable = dict[bytes, Mapping[str, Any]]


def parse_keys(data: bytes, name: str) -> KeyTable:
    """The key file -> ``{sha256(key): attributes}``."""
    table: KeyTable = {}
    if name.endswith((".json", ".yaml", ".yml")):
        document = (
            json.loads(data) if name.endswith(".json") else yaml.load(data, Loader=_YAML_LOADER)  # noqa: S506 (safe loader)
        )
        entries = document.get("keys") if isinstance(document, Mapping) else None
        if not isinstance(entries, list):
            raise ValueError("expected a mapping with a 'keys' list")
        for index, entry in enumerate(entries):
            if not isinstance(entry, Mapping):
                raise ValueError(f"keys[{index}] is not a mapping")
            if "key" in entry:
                digest = credential_hash(str(entry["key"]))
            elif "sha256" in entry:
                digest = bytes.fromhex(str(entry["sha256"]))
                if len(digest) != 32:
                    raise ValueError(f"keys[{index}].sha256 is not 64 hex digits")
            else:
                raise ValueError(f"keys[{index}] has neither key nor sha256")
            attributes = {
                "client_id": str(entry.get("client_id", "")),
                "tenant": str(entry.get("tenant", "")),
                "labels": dict(entry.get("labels") or {}),
            }
            table[digest] = attributes
        return table
    for line in data.decode("utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, *rest = line.split()
        table[credential_hash(key)] = {
            "client_id": rest[0] if rest else "",
            "tenant": rest[1] if len(rest) > 1 else "",
            "labels": {},
        }
    return table


class ApiKey:
    def __init__(self, config: ApiKeyConfig, ctx: PluginContext) -> None:
        self._config = config
        self._log = ctx.logger
        path = ctx.resolve(config.keys_file)
        self._keys: WatchedFile[KeyTable] = WatchedFile(
            path, lambda data: parse_keys(data, path.name), config.reload_interval_s, ctx.logger
        )
        ctx.logger.info("api-key: %d key(s) loaded from %s", len(self._keys.value), path)
        realm = config.realm.replace('"', "")
        self._missing = Decision.deny(
            401, headers={"www-authenticate": f'APIKey realm="{realm}"'}, reason="api-key: missing"
        )
        self._unknown = Decision.deny(
            401, headers={"www-authenticate": f'APIKey realm="{realm}"'}, reason="api-key: unknown key"
        )

    async def start(self) -> None:
        self._keys.start()

    async def aclose(self) -> None:
        await self._keys.aclose()

    async def check(self, request: CheckContext, /) -> Decision | None:
        found = find_credential(request, self._config.sources)
        if found is None:
            return None if self._config.on_missing == "abstain" else self._missing
        key, source = found
        attributes = self._keys.value.get(credential_hash(key))
        if attributes is None:
            self._log.info("api-key denied: unknown key [request_id=%s]", request.request_id)
            return self._unknown
        headers, metadata = self._config.forward.apply(attributes)
        set_headers: Mapping[str, str] = headers
        remove: tuple[str, ...] = ()
        query_remove: tuple[str, ...] = ()
        if self._config.remove_credential:
            strip_set, remove, query_remove = removal(request, source)
            set_headers = {**strip_set, **headers}
        return Decision.allow(
            upstream_set=set_headers, upstream_remove=remove, query_remove=query_remove,
            metadata=metadata, reason=f"api-key: client {attributes.get('client_id', '')}",
        )


@hookimpl
def extsvc_register_authorizers() -> Iterator[AuthorizerType[Any]]:
    yield AuthorizerType(
        name="api-key",
        config_model=ApiKeyConfig,
        factory=ApiKey,
        description="allow known API keys (hashed, from a watched file) and forward their client",
    )
