"""Compiled policies: combine rules, on_error, deadlines, metrics."""

from __future__ import annotations

import asyncio
import time

import pytest

from extsvc.authz.convert import to_check_response
from extsvc.authz.pipeline import CompiledPolicy, Outcome
from extsvc.observability.metrics import Metrics
from extsvc.testing import ScriptPlugin, check_context

from .conftest import CompileYaml


async def policy_of(compile_yaml: CompileYaml, body: str) -> CompiledPolicy:
    """Compile ``policies: {p: <body>}``; ``body`` is a YAML flow mapping or block."""
    runtime = await compile_yaml(f"policies:\n  p: {body}")
    return runtime.policies["p"]


async def run(policy: CompiledPolicy, timeout_s: float = 5.0, **request: object) -> Outcome:
    deadline = asyncio.get_running_loop().time() + timeout_s
    return await policy.evaluate(check_context("/x", **request), deadline)  # type: ignore[arg-type]


def step_errors(metrics: Metrics, reason: str, policy: str = "p") -> float | None:
    return metrics.registry.get_sample_value(
        "extsvc_step_errors_total", {"policy": policy, "plugin": "script", "reason": reason}
    )


def steps(*answers: str, **extra: str) -> str:
    """A flow list of script steps named s0, s1, ... answering as given."""
    items = []
    for index, answer in enumerate(answers):
        config = answer if answer.startswith("{") else f"{{answer: {answer}}}"
        items.append(f"{{plugin: script, name: s{index}, config: {config}}}")
    fields = "".join(f", {k}: {v}" for k, v in extra.items())
    return f"{{steps: [{', '.join(items)}]{fields}}}"


# -- first-decisive ------------------------------------------------------------------------------


async def test_first_decisive_abstain_hands_over_and_first_decision_wins(
    compile_yaml: CompileYaml, script: ScriptPlugin
) -> None:
    policy = await policy_of(
        compile_yaml, steps("abstain", "{answer: deny, status: 401}", "allow")
    )
    outcome = await run(policy)
    assert outcome.label == "deny"
    assert outcome.step == "s1"
    assert outcome.decision.status == 401
    assert outcome.envoy_error is False
    assert script.calls == ["s0", "s1"]  # s2 never ran


async def test_first_decisive_allow_stops_the_pipeline(
    compile_yaml: CompileYaml, script: ScriptPlugin
) -> None:
    policy = await policy_of(compile_yaml, steps("abstain", "allow", "deny"))
    outcome = await run(policy)
    assert (outcome.label, outcome.step, outcome.decision.allowed) == ("allow", "s1", True)
    assert script.calls == ["s0", "s1"]


async def test_first_decisive_all_abstain_answers_the_default_reply(
    compile_yaml: CompileYaml, script: ScriptPlugin
) -> None:
    policy = await policy_of(
        compile_yaml,
        """
    combine: first-decisive
    default_reply: {status: 401, body: "log in\\n", headers: {www-authenticate: Bearer}}
    steps: [{plugin: script}, {plugin: script}]
""",
    )
    outcome = await run(policy)
    assert outcome.label == "deny"
    assert outcome.step == ""
    decision = outcome.decision
    assert (decision.allowed, decision.status, decision.body) == (False, 401, "log in\n")
    assert decision.headers == (("www-authenticate", "Bearer"),)
    assert decision.grpc_code == 16
    assert decision.reason == "no step decided"
    assert script.calls == ["script", "script"]


# -- all-must-allow ------------------------------------------------------------------------------


async def test_all_must_allow_merges_the_mutations_of_allows_in_order(
    compile_yaml: CompileYaml, script: ScriptPlugin
) -> None:
    policy = await policy_of(
        compile_yaml,
        steps(
            "{answer: allow, upstream: {x-a: '1'}, metadata: {user: alice, tier: free}}",
            "abstain",
            "{answer: allow, upstream: {x-b: '2', x-a: '3'}, metadata: {tier: gold}}",
            combine="all-must-allow",
        ),
    )
    outcome = await run(policy)
    assert outcome.label == "allow"
    assert outcome.step == "s2"
    decision = outcome.decision
    assert decision.allowed
    assert decision.upstream_set == (("x-a", "1"), ("x-b", "2"), ("x-a", "3"))
    assert dict(decision.metadata) == {"user": "alice", "tier": "gold"}  # later wins
    assert decision.reason == "s0; s2"
    assert script.calls == ["s0", "s1", "s2"]
    # on the wire: in order, each an overwrite (append=false): Envoy keeps the last x-a
    wire = to_check_response(decision)
    assert [(h.header.key, h.header.value, h.append.value) for h in wire.ok_response.headers] == [
        ("x-a", "1", False), ("x-b", "2", False), ("x-a", "3", False),
    ]


async def test_all_must_allow_any_deny_wins_at_once(
    compile_yaml: CompileYaml, script: ScriptPlugin
) -> None:
    policy = await policy_of(
        compile_yaml, steps("allow", "{answer: deny, status: 429}", "allow", combine="all-must-allow")
    )
    outcome = await run(policy)
    assert (outcome.label, outcome.step, outcome.decision.status) == ("deny", "s1", 429)
    assert script.calls == ["s0", "s1"]


async def test_all_must_allow_all_abstain_is_the_default_deny(
    compile_yaml: CompileYaml, script: ScriptPlugin
) -> None:
    policy = await policy_of(compile_yaml, steps("abstain", "abstain", combine="all-must-allow"))
    outcome = await run(policy)
    assert outcome.label == "deny"
    assert outcome.decision.allowed is False
    assert outcome.decision.status == 403
    assert outcome.decision.reason == "no step decided"


async def test_all_must_allow_a_single_allow_is_returned_as_is(compile_yaml: CompileYaml) -> None:
    policy = await policy_of(
        compile_yaml, steps("abstain", "{answer: allow, upstream: {x-u: v}}", combine="all-must-allow")
    )
    outcome = await run(policy)
    assert outcome.decision.upstream_set == (("x-u", "v"),)


# -- any-allow -----------------------------------------------------------------------------------


async def test_any_allow_first_allow_wins(compile_yaml: CompileYaml, script: ScriptPlugin) -> None:
    policy = await policy_of(
        compile_yaml, steps("{answer: deny, status: 401}", "allow", "deny", combine="any-allow")
    )
    outcome = await run(policy)
    assert (outcome.label, outcome.step, outcome.decision.allowed) == ("allow", "s1", True)
    assert script.calls == ["s0", "s1"]


async def test_any_allow_without_allow_returns_the_first_denial(
    compile_yaml: CompileYaml, script: ScriptPlugin
) -> None:
    policy = await policy_of(
        compile_yaml,
        steps(
            "{answer: deny, status: 401, body: jwt}",
            "abstain",
            "{answer: deny, status: 403, body: key}",
            combine="any-allow",
        ),
    )
    outcome = await run(policy)
    assert outcome.label == "deny"
    assert outcome.step == "s0"
    assert (outcome.decision.status, outcome.decision.body) == (401, "jwt")
    assert script.calls == ["s0", "s1", "s2"]  # every step had its chance to allow


async def test_any_allow_all_abstain_is_the_default(compile_yaml: CompileYaml) -> None:
    policy = await policy_of(
        compile_yaml,
        steps("abstain", combine="any-allow", default_reply="{status: 404, body: none}"),
    )
    outcome = await run(policy)
    assert (outcome.label, outcome.decision.status, outcome.decision.body) == ("deny", 404, "none")


# -- on_error ------------------------------------------------------------------------------------


async def test_a_raising_step_answers_the_error_reply(
    compile_yaml: CompileYaml, script: ScriptPlugin, metrics: Metrics,
    caplog: pytest.LogCaptureFixture,
) -> None:
    policy = await policy_of(compile_yaml, steps("abstain", "raise", "allow"))
    outcome = await run(policy, request_id="rid-7")
    assert outcome.label == "error"
    assert outcome.step == "s1"
    assert outcome.envoy_error is False
    decision = outcome.decision
    assert (decision.allowed, decision.status, decision.body) == (False, 503, "")
    assert "s1" in decision.reason and "RuntimeError" in decision.reason
    assert script.calls == ["s0", "s1"]
    assert step_errors(metrics, "exception") == 1
    assert step_errors(metrics, "timeout") == 0
    assert "step s1 (script) raised RuntimeError('boom') [request_id=rid-7]" in caplog.text


async def test_on_error_deny_uses_a_custom_error_reply(compile_yaml: CompileYaml) -> None:
    policy = await policy_of(
        compile_yaml,
        steps(
            "raise", on_error="deny", error_reply="{status: 500, body: sorry, headers: {retry-after: '1'}}"
        ),
    )
    decision = (await run(policy)).decision
    assert (decision.status, decision.body, decision.headers) == (500, "sorry", (("retry-after", "1"),))


async def test_on_error_allow_lets_the_request_through(compile_yaml: CompileYaml) -> None:
    policy = await policy_of(compile_yaml, steps("raise", "deny", on_error="allow"))
    outcome = await run(policy)
    assert outcome.label == "error"
    assert outcome.decision.allowed is True
    assert outcome.envoy_error is False
    assert to_check_response(outcome.decision).status.code == 0


async def test_on_error_envoy_answers_an_error_response(compile_yaml: CompileYaml) -> None:
    policy = await policy_of(compile_yaml, steps("raise", on_error="envoy"))
    outcome = await run(policy)
    assert outcome.label == "error"
    assert outcome.envoy_error is True
    wire = to_check_response(outcome.decision, envoy_error=outcome.envoy_error)
    assert wire.WhichOneof("http_response") == "error_response"
    assert wire.status.code != 0
    assert not wire.error_response.HasField("status")  # Envoy's status_on_error decides


async def test_a_step_returning_a_non_decision_is_an_error(
    compile_yaml: CompileYaml, metrics: Metrics
) -> None:
    policy = await policy_of(compile_yaml, steps("bad", "allow"))
    outcome = await run(policy)
    assert outcome.label == "error"
    assert outcome.decision.allowed is False
    assert "returned str, not a Decision" in outcome.decision.reason
    assert step_errors(metrics, "bad-result") == 1


@pytest.mark.parametrize(
    ("on_error", "allowed", "envoy_error"),
    [("deny", False, False), ("allow", True, False), ("envoy", False, True)],
)
async def test_a_step_overrunning_the_deadline_is_answered_per_on_error(
    compile_yaml: CompileYaml, metrics: Metrics, script: ScriptPlugin,
    on_error: str, allowed: bool, envoy_error: bool,
) -> None:
    policy = await policy_of(compile_yaml, steps("abstain", "sleep", "allow", on_error=on_error))
    started = time.monotonic()
    outcome = await run(policy, timeout_s=0.05)
    elapsed = time.monotonic() - started
    assert 0.04 <= elapsed < 2.0
    assert outcome.label == "error"
    assert outcome.step == "s1"
    assert outcome.decision.allowed is allowed
    assert outcome.envoy_error is envoy_error
    assert "overran the deadline" in outcome.decision.reason
    assert script.calls == ["s0", "s1"]
    assert step_errors(metrics, "timeout") == 1
    assert step_errors(metrics, "exception") == 0


async def test_the_deadline_is_shared_by_all_steps(
    compile_yaml: CompileYaml, metrics: Metrics
) -> None:
    policy = await policy_of(
        compile_yaml, steps("{answer: sleep, sleep_s: 0.03}", "{answer: sleep, sleep_s: 0.03}",
                            combine="all-must-allow")
    )
    outcome = await run(policy, timeout_s=0.045)
    assert outcome.label == "error"
    assert outcome.step == "s1"  # the first step finished; the second overran
    assert step_errors(metrics, "timeout") == 1


async def test_policy_timeout_ms_caps_the_deadline(
    compile_yaml: CompileYaml, metrics: Metrics
) -> None:
    policy = await policy_of(compile_yaml, steps("sleep", timeout_ms="50"))
    assert policy.timeout_s == pytest.approx(0.05)
    started = time.monotonic()
    outcome = await run(policy, timeout_s=30.0)
    assert time.monotonic() - started < 2.0
    assert outcome.label == "error"
    assert step_errors(metrics, "timeout") == 1


async def test_the_rpc_deadline_applies_when_shorter_than_timeout_ms(
    compile_yaml: CompileYaml,
) -> None:
    policy = await policy_of(compile_yaml, steps("sleep", timeout_ms="30000"))
    started = time.monotonic()
    outcome = await run(policy, timeout_s=0.05)
    assert time.monotonic() - started < 2.0
    assert outcome.label == "error"


async def test_a_fast_policy_is_unaffected_by_its_timer(compile_yaml: CompileYaml) -> None:
    policy = await policy_of(compile_yaml, steps("{answer: sleep, sleep_s: 0.01}", timeout_ms="2000"))
    outcome = await run(policy)
    assert outcome.label == "allow"
    await asyncio.sleep(0.02)  # no stray cancellation is left on the task


async def test_a_cancellation_from_outside_propagates(compile_yaml: CompileYaml) -> None:
    policy = await policy_of(compile_yaml, steps("sleep"))
    task = asyncio.ensure_future(run(policy, timeout_s=30.0))
    await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_step_duration_is_observed_per_step(
    compile_yaml: CompileYaml, metrics: Metrics
) -> None:
    runtime = await compile_yaml(
        "policies: {p: {steps: [{plugin: script}, {plugin: allow}, {plugin: deny}]}}"
    )
    await run(runtime.policies["p"])

    def count(plugin: str) -> float | None:
        return metrics.registry.get_sample_value(
            "extsvc_step_duration_seconds_count", {"policy": "p", "plugin": plugin}
        )

    assert count("script") == 1
    assert count("allow") == 1
    assert count("deny") == 0  # never ran: the allow decided
    assert metrics.registry.get_sample_value(
        "extsvc_step_duration_seconds_sum", {"policy": "p", "plugin": "allow"}
    ) >= 0


async def test_a_raising_step_still_observes_its_duration(
    compile_yaml: CompileYaml, metrics: Metrics
) -> None:
    await run(await policy_of(compile_yaml, steps("raise")))
    assert metrics.registry.get_sample_value(
        "extsvc_step_duration_seconds_count", {"policy": "p", "plugin": "script"}
    ) == 1


async def test_decision_counters_are_bound_per_policy(
    compile_yaml: CompileYaml, metrics: Metrics
) -> None:
    policy = await policy_of(compile_yaml, steps("allow"))
    assert set(policy.counters) == {"allow", "deny", "error"}
    policy.counters["deny"].inc()
    assert metrics.registry.get_sample_value(
        "extsvc_authz_decisions_total", {"policy": "p", "decision": "deny"}
    ) == 1


@pytest.mark.parametrize(
    ("on_error", "allowed", "envoy_error"),
    [("deny", False, False), ("allow", True, False), ("envoy", False, True)],
)
async def test_internal_error_follows_on_error(
    compile_yaml: CompileYaml, on_error: str, allowed: bool, envoy_error: bool
) -> None:
    policy = await policy_of(compile_yaml, steps("allow", on_error=on_error))
    outcome = policy.internal_error(check_context())
    assert outcome.label == "error"
    assert outcome.decision.allowed is allowed
    assert outcome.envoy_error is envoy_error
    if not allowed:
        assert outcome.decision.status == 503


# -- identity scrubbing of reused decisions ---------------------------------------------------------


def test_a_reused_decision_is_scrubbed_for_each_policy_by_its_own_identity_headers() -> None:
    """Plugins return cached Decision objects; the scrub result is cached on them, per policy."""
    from extsvc.config.model import Combine, OnError
    from extsvc.plugin.check import Decision

    def policy(*identity: str) -> CompiledPolicy:
        deny = Decision.deny(403)
        return CompiledPolicy("p", (), Combine.ANY_ALLOW, OnError.DENY, deny, deny, None, {},
                              frozenset(identity))

    cached = Decision.allow(upstream_set={"x-user": "alice"})
    jwt_or_key, jwt_only = policy("x-user", "x-client-id"), policy("x-user")
    for _ in range(2):  # the second pass is served from the cache
        first = jwt_or_key._scrub_identity(Outcome(cached, "allow", "jwt"))
        assert first.decision.upstream_remove == ("x-client-id",)
        assert dict(first.decision.upstream_set) == {"x-user": "alice"}
        assert (first.label, first.step) == ("allow", "jwt")
        second = jwt_only._scrub_identity(Outcome(cached, "allow", "jwt"))
        assert second.decision is cached  # nothing to remove: the very same answer
    assert cached.upstream_remove == ()  # the shared decision itself is never changed


# -- memos: the steady state builds nothing per request ---------------------------------------------


async def test_the_merge_of_reused_decisions_is_built_once_and_encoded_once(
    compile_yaml: CompileYaml,
) -> None:
    """all-must-allow over steps that return the same decisions (cached tokens, known keys):
    the merged answer is the same object every time, so its CheckResponse is built once too."""
    policy = await policy_of(
        compile_yaml,
        "{combine: all-must-allow, steps: ["
        "{plugin: set-headers, name: a, config: {upstream: {x-a: '1'}, metadata: {user: alice}}}, "
        "{plugin: set-headers, name: b, config: {upstream: {x-b: '2'}}}]}",
    )
    first, second = await run(policy), await run(policy)
    assert first.decision is second.decision
    assert dict(first.decision.upstream_set) == {"x-a": "1", "x-b": "2"}
    assert dict(first.decision.metadata) == {"user": "alice"}
    assert to_check_response(first.decision) is to_check_response(second.decision)


def test_the_merge_memo_is_keyed_by_both_decisions_and_bounded() -> None:
    from extsvc.authz.pipeline import _Memo
    from extsvc.plugin.check import Decision

    a, b, c = (Decision.allow(upstream_set={f"x-{n}": "1"}) for n in "abc")
    memo = _Memo(max_entries=2)
    memo.put(a, a.merge(b), b)
    assert memo.get(a, b) is not None
    assert memo.get(b, a) is None and memo.get(a, c) is None and memo.get(a) is None
    memo.put(a, a.merge(c), c)
    memo.put(b, b.merge(c), c)  # the oldest entry goes
    assert memo.get(a, b) is None
    assert memo.get(b, c) is not None and memo.get(a, c) is not None


async def test_on_error_answers_are_built_once_per_step_and_reason(
    compile_yaml: CompileYaml,
) -> None:
    policy = await policy_of(compile_yaml, steps("raise", on_error="envoy"))
    first, second = await run(policy), await run(policy)
    assert first is second  # the same Outcome: nothing built per failing request
    assert to_check_response(first.decision, envoy_error=True) is to_check_response(
        second.decision, envoy_error=True
    )
    assert policy.internal_error(check_context(), "overloaded") is policy.internal_error(
        check_context(), "overloaded"
    )
    assert policy.internal_error(check_context(), "other").decision.reason == "other"
