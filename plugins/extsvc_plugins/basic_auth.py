"""``basic-auth``: HTTP Basic authentication against an htpasswd file.

Supported hashes: bcrypt (``$2y$``/``$2b$``/``$2a$``, what ``htpasswd -B`` writes) and SHA-256 /
SHA-512 crypt (``$5$``/``$6$``, ``mkpasswd -m sha-512``; verified by libpass's pure-Python
implementation, so no ``crypt`` module is needed, which Python 3.13 removed). Weaker schemes
(MD5 ``$apr1$``, SHA-1 ``{SHA}``, DES crypt, plain text) and malformed hashes are refused when the
file is loaded, naming the line. As with ``htpasswd``, bcrypt looks at the first 72 bytes of a
password.

Verification runs off the event loop; successful verifications are cached for ``cache_ttl_s``
(keyed by a hash of user and password, dropped when the file changes), so bcrypt's deliberate
slowness is paid once per user and password, not on every request.

An unknown user costs the same hash work as a wrong password, so response times do not reveal
user names: the password is checked against the hash of another entry (and the request denied
either way) -- one of the file's most common hash *kind*, the scheme and its cost together
(bcrypt cost 10, SHA-512 crypt 5000 rounds...), since a wrong password costs what its user's kind
costs. When every entry is of one kind (the usual file) no name can be told apart. A file that
mixes kinds is logged as a warning when loaded: an unknown user then takes as long as a wrong
password for the most common kind, and a failed login for a user of another kind takes visibly
longer or shorter, which tells those (fewer) names apart; rehash them with the common kind.
Checking unknown users against every kind's hash would not help: no known user costs that sum.

Example::

    - plugin: basic-auth
      config:
        htpasswd_file: /etc/extsvc/htpasswd/htpasswd
        realm: internal
        forward: {headers: {x-user: user}}
        remove_credential: true
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import bcrypt
from passlib.hash import sha256_crypt, sha512_crypt
from pydantic import BaseModel, ConfigDict, Field

from extsvc import AuthorizerType, CheckContext, Decision, PluginContext, hookimpl
from extsvc.credentials import (
    CredentialSource,
    Forward,
    TtlCache,
    WatchedFile,
    credential_hash,
    removal,
)

_AUTHORIZATION = CredentialSource(header="authorization")
_BCRYPT = re.compile(r"^\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}$")
#: Verified against when the file has no entry at all (cost 10, the password is random).
_DUMMY_BCRYPT = "$2b$10$C6UzMDM.H6dfI/f/IKxGhuQyd3rqfENr5KR3aFNoJm6fW0oG1Fkzq"
#: Longest Authorization header decoded (user and password of a few hundred bytes fit easily).
_MAX_HEADER_BYTES = 4096


class BasicAuthConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    htpasswd_file: str
    realm: str = "extsvc"
    cache_ttl_s: float = Field(60.0, ge=0)
    cache_max_entries: int = Field(10_000, ge=0)
    forward: Forward = Field(default_factory=lambda: Forward(metadata={"user": "user"}))
    remove_credential: bool = False
    reload_interval_s: float = Field(5.0, ge=0)
    on_missing: Literal["deny", "abstain"] = "deny"


@dataclass(frozen=True, slots=True)
class Htpasswd:
    """A parsed htpasswd file: ``users`` (name -> hash), the hash unknown users are checked
    against (the first entry of the most common kind: see the module docstring), and how many
    entries each kind has (``"bcrypt cost 10"`` -> 3)."""

    users: dict[str, str]
    dummy: str = _DUMMY_BCRYPT
    kinds: dict[str, int] = field(default_factory=dict)


def parse_htpasswd(data: bytes) -> Htpasswd:
    users: dict[str, str] = {}
    #: per hash kind, its entries' count and first hash (insertion order: the file's)
    kinds: dict[str, tuple[int, str]] = {}
    for number, raw in enumerate(data.decode("utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        if not sep or not user or not hashed:
            raise ValueError(f"line {number}: expected user:hash")
        kind = _kind(hashed)
        if kind is None:
            raise ValueError(
                f"line {number} (user {user!r}): unsupported, weak or malformed hash; use bcrypt "
                "(htpasswd -B) or SHA-256/512 crypt"
            )
        if user in users:
            raise ValueError(f"line {number}: user {user!r} is listed twice")
        users[user] = hashed
        count, first = kinds.get(kind, (0, hashed))
        kinds[kind] = (count + 1, first)
    # an entry of the most common kind; between kinds as common, the first in the file
    dummy, most = _DUMMY_BCRYPT, 0
    for count, first in kinds.values():
        if count > most:
            dummy, most = first, count
    return Htpasswd(users, dummy, {kind: count for kind, (count, _) in kinds.items()})


def _kind(hashed: str) -> str | None:
    """A supported, well-formed hash's kind: its scheme and cost (what verifying it costs);
    ``None`` for anything else."""
    if hashed.startswith("$2"):
        match = _BCRYPT.match(hashed)
        return f"bcrypt cost {int(match.group(1))}" if match else None
    handler = sha512_crypt if hashed.startswith("$6$") else sha256_crypt if hashed.startswith("$5$") else None
    if handler is None:
        return None
    try:
        parsed = handler.from_string(hashed)
    except ValueError:
        return None
    if parsed.checksum is None:  # "$6$salt$" is a salt without a hash
        return None
    return f"{handler.name.replace('_', '-')} {parsed.rounds} rounds"


def verify(password: str, hashed: str) -> bool:
    """Whether ``password`` matches ``hashed`` (a hash :func:`parse_htpasswd` accepted)."""
    secret = password.encode("utf-8")
    if hashed.startswith("$6$"):
        return bool(sha512_crypt.verify(secret, hashed))
    if hashed.startswith("$5$"):
        return bool(sha256_crypt.verify(secret, hashed))
    # bcrypt uses 72 bytes; htpasswd -B hashed the same 72 (the bcrypt package now refuses more)
    return bcrypt.checkpw(secret[:72], hashed.encode("ascii"))


class BasicAuth:
    """A compiled ``basic-auth`` step (see the module docstring)."""

    def __init__(self, config: BasicAuthConfig, ctx: PluginContext) -> None:
        self._config = config
        self._log = ctx.logger
        self._clock = ctx.clock
        self._cache: TtlCache[bool] = TtlCache(config.cache_max_entries, ctx.clock)
        self._users: WatchedFile[Htpasswd] = WatchedFile(
            ctx.resolve(config.htpasswd_file), parse_htpasswd, config.reload_interval_s,
            ctx.logger, on_change=self._changed,
        )
        self._warn_if_mixed(self._users.value)
        self.identity_headers = config.forward.header_names()
        realm = config.realm.replace('"', "").replace("\\", "")
        self._challenge = {"www-authenticate": f'Basic realm="{realm}", charset="UTF-8"'}
        self._missing = Decision.deny(401, headers=self._challenge, reason="basic-auth: no credentials")

    def _changed(self, table: Htpasswd) -> None:
        self._cache.clear()
        self._warn_if_mixed(table)

    def _warn_if_mixed(self, table: Htpasswd) -> None:
        if len(table.kinds) < 2:
            return
        kinds = sorted(table.kinds.items(), key=lambda item: -item[1])
        others = sum(count for _, count in kinds[1:])
        self._log.warning(
            "basic-auth: %s mixes hash kinds (%s): unknown users are checked against %s, so the "
            "time of a failed login can tell apart the %d user(s) of the other kinds; rehash "
            "them as %s",
            self._users.path, ", ".join(f"{kind}: {count}" for kind, count in kinds),
            kinds[0][0], others, kinds[0][0],
        )

    async def start(self) -> None:
        self._users.start()

    async def aclose(self) -> None:
        await self._users.aclose()

    def _deny(self, reason: str, request: CheckContext) -> Decision:
        self._log.info("basic-auth denied: %s [request_id=%s]", reason, request.request_id)
        return Decision.deny(401, headers=self._challenge, reason=f"basic-auth: {reason}")

    async def check(self, request: CheckContext, /) -> Decision | None:
        header = request.headers.get("authorization")
        if header is None or header[:6].lower() != "basic ":
            if self._config.on_missing == "abstain":
                return None
            self._log.debug("basic-auth denied: no credentials [request_id=%s]", request.request_id)
            return self._missing
        if len(header) > _MAX_HEADER_BYTES:
            return self._deny("credentials too long", request)
        try:
            decoded = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return self._deny("malformed credentials", request)
        user, sep, password = decoded.partition(":")
        if not sep or not user:
            return self._deny("malformed credentials", request)
        key = credential_hash(f"{user}\x00{password}")
        if not self._cache.get(key):
            table = self._users.value
            hashed = table.users.get(user)
            ok = await asyncio.to_thread(verify, password, hashed or table.dummy)
            if hashed is None:
                return self._deny(f"unknown user {user[:64]!r}", request)
            if not ok:
                return self._deny(f"wrong password for {user[:64]!r}", request)
            if self._config.cache_ttl_s > 0:
                self._cache.put(key, True, self._clock() + self._config.cache_ttl_s)
        headers, metadata = self._config.forward.apply({"user": user})
        remove: tuple[str, ...] = ()
        if self._config.remove_credential:
            _, remove, _ = removal(request, _AUTHORIZATION)
        return Decision.allow(
            upstream_set=headers, upstream_remove=remove, metadata=metadata,
            reason=f"basic-auth: {user[:64]}",
        )


@hookimpl
def extsvc_register_authorizers() -> Iterator[AuthorizerType[Any]]:
    yield AuthorizerType(
        name="basic-auth",
        config_model=BasicAuthConfig,
        factory=BasicAuth,
        description="HTTP Basic against an htpasswd file (bcrypt, SHA-256/512 crypt), cached",
    )
