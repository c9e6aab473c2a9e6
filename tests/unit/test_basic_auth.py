"""The ``basic-auth`` plugin: htpasswd hashes, the verification cache, reloads, malformed input."""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import bcrypt
import pytest

from extsvc import Decision
from extsvc.testing import check_context
from extsvc_plugins import basic_auth
from extsvc_plugins.basic_auth import BasicAuth, BasicAuthConfig, parse_htpasswd

from .authkit import FakeClock, context

# Made by glibc's crypt(3) (SHA-256/512 crypt) and `htpasswd -B`-style bcrypt ($2y$, cost 4):
# the plugin verifies them without the stdlib crypt module, which Python 3.13 removed.
SHA256 = "$5$saltsalt1234567$bhJ844jM9E0DlZZyTXdYTUycdPZXDejRyeIuyiIL7FC"  # s3cret-256
SHA512 = (  # s3cret-512
    "$6$rounds=10000$saltsalt1234567$EN59.jZpJb088nMSFWDN8UwrsVIzWhh53o4pWyR/krXWO0BL9QGnveSmIlg7JKJ7"
    "jQ85LofmsSgr/iy202I4n."
)
BCRYPT = "$2y$04$OP4BDVFa43TSEWLWrDTxQed8tpwGDlBIHLjiuTWREbZK8n/7c3G4."  # bcrypt-pw
HTPASSWD = f"# users\nalice:{BCRYPT}\nbob:{SHA256}\ncarol:{SHA512}\n"


def basic(user: str, password: str) -> dict[str, str]:
    return {"authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


class Steps:
    def __init__(self, folder: Path, clock: FakeClock) -> None:
        self.folder = folder
        self.clock = clock
        self.built: list[BasicAuth] = []

    async def __call__(self, text: str = HTPASSWD, **config: Any) -> BasicAuth:
        (self.folder / "htpasswd").write_text(text)
        step = BasicAuth(
            BasicAuthConfig.model_validate({"htpasswd_file": "htpasswd", "reload_interval_s": 0, **config}),
            context("basic-auth", self.clock, base_dir=self.folder),
        )
        await step.start()
        self.built.append(step)
        return step


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def steps(tmp_path: Path, clock: FakeClock) -> AsyncIterator[Steps]:
    maker = Steps(tmp_path, clock)
    yield maker
    for step in maker.built:
        await step.aclose()


@pytest.fixture
def verifications(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The hashes the plugin verified against (a spy: it still runs the real verification)."""
    seen: list[str] = []
    real = basic_auth.verify

    def spy(password: str, hashed: str) -> bool:
        seen.append(hashed)
        return real(password, hashed)

    monkeypatch.setattr(basic_auth, "verify", spy)
    return seen


async def check(step: BasicAuth, **request: Any) -> Decision:
    decision = await step.check(check_context("/", **request))
    assert decision is not None
    return decision


@pytest.mark.parametrize(
    ("user", "password"), [("alice", "bcrypt-pw"), ("bob", "s3cret-256"), ("carol", "s3cret-512")]
)
async def test_bcrypt_and_sha_crypt_users_are_allowed(steps: Steps, user: str, password: str) -> None:
    step = await steps(forward={"headers": {"x-user": "user"}, "metadata": {"user": "user"}})
    decision = await check(step, headers=basic(user, password))
    assert decision.allowed
    assert dict(decision.upstream_set) == {"x-user": user}
    assert dict(decision.metadata) == {"user": user}
    assert not (await check(step, headers=basic(user, password + "x"))).allowed


def test_sha_crypt_does_not_need_the_stdlib_crypt_module() -> None:
    """As on Python 3.13+, where ``crypt`` is gone: the import is made to fail before libpass loads."""
    program = (
        "import sys; sys.modules['crypt'] = None\n"
        "from extsvc_plugins.basic_auth import verify\n"
        f"assert verify('s3cret-512', {SHA512!r}) and verify('s3cret-256', {SHA256!r})\n"
        f"assert not verify('wrong', {SHA512!r})\n"
    )
    subprocess.run([sys.executable, "-c", program], check=True, timeout=60)


async def test_a_bcrypt_password_over_72_bytes_is_checked_like_htpasswd_does(steps: Steps) -> None:
    long_password = "p" * 80
    hashed = bcrypt.hashpw(long_password.encode()[:72], bcrypt.gensalt(4)).decode()
    step = await steps(f"dave:{hashed}\n")
    assert (await check(step, headers=basic("dave", long_password))).allowed  # no exception


async def test_a_successful_verification_is_cached_for_its_ttl(
    steps: Steps, clock: FakeClock, verifications: list[str]
) -> None:
    step = await steps(cache_ttl_s=30)
    for _ in range(3):
        assert (await check(step, headers=basic("alice", "bcrypt-pw"))).allowed
    assert len(verifications) == 1
    clock.advance(31)
    assert (await check(step, headers=basic("alice", "bcrypt-pw"))).allowed
    assert len(verifications) == 2
    for _ in range(2):  # failures are never cached
        assert not (await check(step, headers=basic("alice", "wrong"))).allowed
    assert len(verifications) == 4


async def test_an_unknown_user_costs_a_verification_too(steps: Steps, verifications: list[str]) -> None:
    step = await steps()
    decision = await check(step, headers=basic("mallory", "bcrypt-pw"))
    assert not decision.allowed
    assert verifications == [BCRYPT]  # checked against the first entry's hash, then denied


SHA512_OTHER = "$6$rounds=10000$othersalt123456$" + "x" * 86  # another user, the same kind as SHA512


def test_unknown_users_are_checked_against_the_most_common_hash_kind() -> None:
    """Scheme and cost together: a wrong password costs what its user's kind costs."""
    table = parse_htpasswd(f"alice:{BCRYPT}\nbob:{SHA256}\ncarol:{SHA512}\ndan:{SHA512_OTHER}\n".encode())
    assert table.kinds == {
        "bcrypt cost 4": 1, "sha256-crypt 5000 rounds": 1, "sha512-crypt 10000 rounds": 2
    }
    assert table.dummy == SHA512  # the first entry of the most common kind, not the first entry
    bcrypt_12 = "$2y$12$" + BCRYPT[7:]
    assert parse_htpasswd(f"a:{BCRYPT}\nb:{bcrypt_12}\nc:{bcrypt_12}\n".encode()).kinds == {
        "bcrypt cost 4": 1, "bcrypt cost 12": 2,
    }
    # as common: the first in the file; no entry at all: a bcrypt dummy
    assert parse_htpasswd(f"bob:{SHA256}\nalice:{BCRYPT}\n".encode()).dummy == SHA256
    assert parse_htpasswd(b"# nobody\n").dummy.startswith("$2b$10$")


async def test_a_file_mixing_hash_kinds_is_logged(steps: Steps, caplog: pytest.LogCaptureFixture) -> None:
    await steps(f"alice:{BCRYPT}\ncarol:{SHA512}\ndan:{SHA512_OTHER}\n")
    [warning] = [r.getMessage() for r in caplog.records if "mixes hash kinds" in r.getMessage()]
    assert "(sha512-crypt 10000 rounds: 2, bcrypt cost 4: 1)" in warning
    assert "the 1 user(s) of the other kinds" in warning
    caplog.clear()
    await steps(f"carol:{SHA512}\ndan:{SHA512_OTHER}\n")
    assert "mixes hash kinds" not in caplog.text


async def test_a_changed_file_is_reloaded_and_the_cache_dropped(steps: Steps, tmp_path: Path) -> None:
    step = await steps()
    assert (await check(step, headers=basic("alice", "bcrypt-pw"))).allowed
    path = tmp_path / "htpasswd"
    path.write_text(f"bob:{SHA256}\n")  # alice removed
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 1_000_000))
    assert await step._users.check()
    assert not (await check(step, headers=basic("alice", "bcrypt-pw"))).allowed  # not served from cache


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("eve:$apr1$abcdefgh$0123456789abcdefghijk.", "unsupported, weak or malformed"),
        ("eve:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=", "unsupported, weak or malformed"),
        ("eve:plaintext", "unsupported, weak or malformed"),
        ("eve:$2y$04$tooshort", "unsupported, weak or malformed"),
        ("eve:$6$salt$", "unsupported, weak or malformed"),
        ("no-colon", "expected user:hash"),
        (f"alice:{BCRYPT}", "user 'alice' is listed twice"),
    ],
)
def test_weak_or_malformed_entries_are_refused_with_the_line(line: str, message: str) -> None:
    with pytest.raises(ValueError, match=f"^line 2.*{re.escape(message)}"):
        parse_htpasswd(f"alice:{BCRYPT}\n{line}\n".encode())


@pytest.mark.parametrize(
    "header",
    [
        "Basic !!!not-base64!!!",
        "Basic " + base64.b64encode(b"no-colon").decode(),
        "Basic " + base64.b64encode(b":password-without-user").decode(),
        "Basic " + base64.b64encode(b"\xff\xfe:x").decode(),
        "Basic " + "A" * 5000,
    ],
)
async def test_malformed_credentials_are_401(steps: Steps, header: str) -> None:
    step = await steps()
    decision = await check(step, headers={"authorization": header})
    assert (decision.allowed, decision.status) == (False, 401)
    assert dict(decision.headers) == {"www-authenticate": 'Basic realm="extsvc", charset="UTF-8"'}


async def test_missing_credentials_deny_or_abstain_and_removal(steps: Steps) -> None:
    step = await steps(remove_credential=True)
    assert (await check(step, headers={"authorization": "Bearer x"})).status == 401
    allowed = await check(step, headers=basic("alice", "bcrypt-pw"))
    assert allowed.upstream_remove == ("authorization",)
    abstaining = await steps(on_missing="abstain")
    assert await abstaining.check(check_context("/")) is None
