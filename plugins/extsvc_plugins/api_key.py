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

import hashlib
import json
from collections.abc import Iterator, Mapping
from types import MappingProxyType
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


_NO_LABELS: Mapping[str, str] = MappingProxyType({})
#: allow decisions remembered per key (a simple bound: the memo starts over when full)
_DECISIONS_KEPT = 10_000


class KeyTable:
    """The keys of one file: ``sha256(key) -> attributes`` (``client_id``, ``tenant``, ``labels``).

    Loading only hashes and indexes each key; its attributes are built when it is used, which
    keeps 100,000 keys well under the 2 s load budget.
    """

    __slots__ = ("_index", "_records")

    def __init__(self) -> None:
        self._index: dict[bytes, int] = {}
        #: a JSON/YAML entry (a dict without its key) or a text line's (client_id, tenant)
        self._records: list[dict[str, Any] | tuple[str, str]] = []

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, digest: object) -> bool:
        return digest in self._index

    def get(self, digest: bytes) -> Mapping[str, Any] | None:
        position = self._index.get(digest)
        if position is None:
            return None
        record = self._records[position]
        if isinstance(record, tuple):
            return {"client_id": record[0], "tenant": record[1], "labels": _NO_LABELS}
        labels = record.get("labels")
        return {
            "client_id": str(record.get("client_id", "")),
            "tenant": str(record.get("tenant", "")),
            "labels": {str(k): str(v) for k, v in labels.items()} if labels else _NO_LABELS,
        }


def parse_keys(data: bytes, name: str) -> KeyTable:
    """The key file -> a :class:`KeyTable` of SHA-256 hashes.

    A key listed twice is an error (two clients sharing one key cannot be told apart); the
    message names the entry, never the key. Hashing is :func:`extsvc.credentials.credential_hash`
    inlined (SHA-256 of the UTF-8 key): this loop runs once per key.
    """
    table = KeyTable()
    sha256 = hashlib.sha256
    index_of, records = table._index, table._records  # filled inline: no call per key
    if name.endswith((".json", ".yaml", ".yml")):
        document = (
            json.loads(data) if name.endswith(".json") else yaml.load(data, Loader=_YAML_LOADER)  # noqa: S506 (safe loader)
        )
        entries = document.get("keys") if isinstance(document, Mapping) else None
        if not isinstance(entries, list):
            raise ValueError("expected a mapping with a 'keys' list")
        for index, entry in enumerate(entries):
            if type(entry) is not dict:
                raise ValueError(f"keys[{index}] is not a mapping")
            key = entry.pop("key", None)  # the record keeps no key: memory holds hashes only
            if key is not None:
                if type(key) is not str or not key or key != key.strip():
                    raise ValueError(f"keys[{index}].key must be a non-empty string without outer spaces")
                digest = sha256(key.encode("utf-8", "surrogateescape")).digest()
            elif "sha256" in entry:
                try:
                    digest = bytes.fromhex(str(entry["sha256"]))
                except ValueError:
                    digest = b""
                if len(digest) != 32:
                    raise ValueError(f"keys[{index}].sha256 is not 64 hex digits")
            else:
                raise ValueError(f"keys[{index}] has neither key nor sha256")
            labels = entry.get("labels")
            if labels and type(labels) is not dict:
                raise ValueError(f"keys[{index}].labels is not a mapping")
            if digest in index_of:
                raise ValueError(f"keys[{index}]: duplicate key")
            index_of[digest] = len(records)
            records.append(entry)
        return table
    for number, line in enumerate(data.decode("utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, *rest = line.split()
        digest = sha256(key.encode("utf-8", "surrogateescape")).digest()
        if digest in index_of:
            raise ValueError(f"line {number}: duplicate key")
        index_of[digest] = len(records)
        records.append((rest[0] if rest else "", rest[1] if len(rest) > 1 else ""))
    return table


class ApiKey:
    """A compiled ``api-key`` step (see the module docstring)."""

    def __init__(self, config: ApiKeyConfig, ctx: PluginContext) -> None:
        self._config = config
        self._log = ctx.logger
        self.identity_headers = config.forward.header_names()
        path = ctx.resolve(config.keys_file)
        #: the allow decision of each key seen lately (built once; dropped when the file changes)
        self._decisions: dict[bytes, Decision] = {}
        #: the same without the credential (remove_credential), per key and source
        self._stripped: dict[tuple[bytes, int], Decision] = {}
        self._keys: WatchedFile[KeyTable] = WatchedFile(
            path, lambda data: parse_keys(data, path.name), config.reload_interval_s, ctx.logger,
            on_change=lambda _table: self._forget(),
        )
        ctx.logger.info("api-key: %d key(s) loaded from %s", len(self._keys.value), path)
        realm = config.realm.replace('"', "")
        self._missing = Decision.deny(
            401, headers={"www-authenticate": f'APIKey realm="{realm}"'}, reason="api-key: missing"
        )
        self._unknown = Decision.deny(
            401, headers={"www-authenticate": f'APIKey realm="{realm}"'}, reason="api-key: unknown key"
        )

    def _forget(self) -> None:
        """Drop the decisions built from the previous key file."""
        self._decisions.clear()
        self._stripped.clear()

    async def start(self) -> None:
        self._keys.start()

    async def aclose(self) -> None:
        await self._keys.aclose()

    async def check(self, request: CheckContext, /) -> Decision | None:
        found = find_credential(request, self._config.sources)
        if found is None:
            if self._config.on_missing == "abstain":
                return None
            self._log.debug("api-key denied: no key [request_id=%s]", request.request_id)
            return self._missing
        key, source = found
        digest = credential_hash(key)
        decision = self._decisions.get(digest)
        if decision is None:
            attributes = self._keys.value.get(digest)
            if attributes is None:
                self._log.info("api-key denied: unknown key [request_id=%s]", request.request_id)
                return self._unknown
            headers, metadata = self._config.forward.apply(attributes)
            decision = Decision.allow(
                upstream_set=headers, metadata=metadata,
                reason=f"api-key: client {attributes.get('client_id', '')}",
            )
            if len(self._decisions) >= _DECISIONS_KEPT:
                self._decisions.clear()
            self._decisions[digest] = decision
        if self._config.remove_credential:
            if source.cookie is not None:  # the Cookie header is rewritten per request
                return self._strip(decision, request, source)
            # a header or query key is removed alike from every request: built once per key
            memo_key = (digest, id(source))
            stripped = self._stripped.get(memo_key)
            if stripped is None:
                stripped = self._strip(decision, request, source)
                if len(self._stripped) >= _DECISIONS_KEPT:
                    self._stripped.clear()
                self._stripped[memo_key] = stripped
            return stripped
        return decision

    @staticmethod
    def _strip(decision: Decision, request: CheckContext, source: CredentialSource) -> Decision:
        strip_set, remove, query_remove = removal(request, source)
        return Decision.allow(
            upstream_set=strip_set, upstream_remove=remove, query_remove=query_remove
        ).merge(decision)


@hookimpl
def extsvc_register_authorizers() -> Iterator[AuthorizerType[Any]]:
    yield AuthorizerType(
        name="api-key",
        config_model=ApiKeyConfig,
        factory=ApiKey,
        description="allow known API keys (hashed, from a watched file) and forward their client",
    )
