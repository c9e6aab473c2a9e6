"""Shared answers: fixed header changes (``Processor.fixed_headers``) and the answer memo of the
hooks' header-only changes give the answers the hooks would."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict

from extsvc import (
    HeaderChanges,
    HttpMessage,
    Phase,
    PluginContext,
    Processor,
    ProcessorType,
    hookimpl,
)
from extsvc.errors import ConfigError
from extsvc.extproc import convert
from extsvc.extproc.stream import ANSWER_MEMO_SIZE, ExtprocStream
from extsvc.plugin.host import PluginHost
from extsvc.testing import ScriptPlugin
from extsvc.testing.extproc import body_message, headers_message, stream_for

from .extproc_kit import common, scripted_stream, set_headers

REQUEST = {":path": "/a", ":method": "POST", "x-old": "1", "content-length": "2"}
RESPONSE = {":status": "200", "server": "up"}

CHAINS = [
    # (processors: list of script configs), each run fixed and not fixed
    ["{phases: [request_headers, response_headers], set: {x-a: '1'}, append: {via: ext}}"],
    ["{phases: [request_headers], set: {x-a: '1'}, remove: [x-old]}",
     "{phases: [request_headers], remove: [x-a], append: {x-b: '2'}}"],
    ["{phases: [response_headers], remove: [server], set: {x-frame-options: DENY}}",
     "{phases: [request_headers, response_headers], append: {x-frame-options: SAMEORIGIN}}"],
]
MODES = [("none", "none"), ("buffered", "buffered"), ("streamed", "none")]


def policy(chain: list[str], fixed: bool) -> str:
    steps = "\n".join(
        f"  - {{plugin: script, name: s{i}, config: {step[:-1]}, fixed: {str(fixed).lower()}}}}}"
        for i, step in enumerate(chain)
    )
    return f"processors:\n{steps}\n"


async def answers(chain: list[str], fixed: bool, modes: tuple[str, str]) -> tuple[list[bytes], ScriptPlugin]:
    plugin = ScriptPlugin()
    stream = await scripted_stream(plugin, policy(chain, fixed))
    out = []
    for message in (headers_message(REQUEST, modes=modes),
                    headers_message(RESPONSE, response=True)):
        out += [answer.SerializeToString(deterministic=True) for answer in await stream.feed(message)]
    return out, plugin


@pytest.mark.parametrize("modes", MODES)
@pytest.mark.parametrize("chain", CHAINS)
async def test_fixed_answers_equal_the_hooks_answers_without_calling_them(
    chain: list[str], modes: tuple[str, str]
) -> None:
    hooked, hooked_plugin = await answers(chain, fixed=False, modes=modes)
    fixed, fixed_plugin = await answers(chain, fixed=True, modes=modes)
    assert fixed == hooked
    assert hooked_plugin.processed, "the hooks ran without fixed_headers"
    assert fixed_plugin.processed == []  # every processor was fixed: no hook ran
    # A second stream of the same policy gets the same (shared, prebuilt) answers.
    again, _ = await answers(chain, fixed=True, modes=modes)
    assert again == fixed


async def test_one_processor_without_fixed_changes_runs_the_whole_chain() -> None:
    plugin = ScriptPlugin()
    stream = await scripted_stream(plugin, """
processors:
  - {plugin: script, name: f, config: {phases: [request_headers], set: {x-a: '1'}, fixed: true}}
  - {plugin: script, name: d, config: {phases: [request_headers], set: {x-b: '2'}}}
""")
    [answer] = await stream.feed(headers_message(REQUEST, modes=("none", "none")))
    assert set_headers(common(answer).header_mutation) == [("x-a", b"1", False), ("x-b", b"2", False)]
    assert [label for label, *_ in plugin.processed] == ["f", "d"]


async def test_later_processors_read_the_headers_as_fixed_changes_left_them() -> None:
    plugin = ScriptPlugin()
    stream = await scripted_stream(plugin, """
processors:
  - {plugin: script, name: f,
     config: {phases: [request_headers], set: {x-a: '1'}, remove: [x-old], fixed: true}}
  - {plugin: script, name: reader, config: {phases: [request_body]}}
""")
    await stream.feed(headers_message(REQUEST, modes=("buffered", "none")))
    await stream.feed(body_message(b"{}"))
    [(label, phase, headers, _)] = plugin.processed
    assert (label, phase) == ("reader", Phase.REQUEST_BODY)
    assert headers["x-a"] == "1" and "x-old" not in headers


async def test_the_headers_builtin_is_fixed_unless_it_renames() -> None:
    stream = await stream_for(
        "extproc:\n  default_policy: p\n  policies:\n    p:\n      processors:\n"
        "        - {plugin: headers, config: {request: {set: {x-a: '1'}}, "
        "response: {rename: {x-up: x-down}}}}\n"
    )
    compiled = stream._policies.policies["p"]  # type: ignore[union-attr]
    assert compiled.fixed[Phase.REQUEST_HEADERS.number] is not None
    assert compiled.fixed[Phase.RESPONSE_HEADERS.number] is None  # the rename reads the value
    [answer] = await stream.feed(headers_message({**REQUEST, "x-up": "v"}, modes=("none", "none")))
    assert set_headers(common(answer).header_mutation) == [("x-a", b"1", False)]
    [answer] = await stream.feed(headers_message({**RESPONSE, "x-up": "v"}, response=True))
    assert set_headers(common(answer).header_mutation) == [("x-down", b"v", False)]


@pytest.mark.parametrize(
    ("option", "message"),
    [("fixed_raises",
      "processors\\[0\\]: processor .script.: fixed_headers\\(request_headers\\) raised ValueError"),
     ("fixed_wrong_type", "fixed_headers\\(request_headers\\) returned dict, expected HeaderChanges")],
)
async def test_a_bad_fixed_headers_is_a_config_error_naming_the_step(option: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        await scripted_stream(ScriptPlugin(), f"""
processors:
  - {{plugin: script, name: s0, config: {{phases: [request_headers], {option}: true}}}}
""")


async def test_override_answers_of_shared_answers_are_built_once_per_policy() -> None:
    plugin = ScriptPlugin()
    config = """
processors:
  - {plugin: script, config: {phases: [request_headers], set: {x-a: '1'}, fixed: true}}
"""
    first = await scripted_stream(plugin, config)
    [one] = await first.feed(headers_message(REQUEST, modes=("buffered", "buffered")))
    second = first.__class__(first._policies)
    [two] = await second.feed(headers_message(REQUEST, modes=("buffered", "buffered")))
    assert one is two  # memoised on the policy
    compiled = first._policies.policies["p"]  # type: ignore[union-attr]
    expected = convert.with_mode_override(
        compiled.fixed[0].answer, request_body=convert.BodyMode.NONE,
        response_body=convert.BodyMode.NONE, skip_response_headers=True,
    )
    assert one == expected


def test_header_changes_ops_are_remove_then_set_then_add_lower_cased() -> None:
    changes = HeaderChanges(set={"X-A": "1"}, add={"Via": "e"}, remove=["X-Old"])
    assert changes.ops() == ((2, "x-old"), (0, "x-a", "1"), (1, "via", "e"))


async def test_hooks_making_the_same_changes_share_one_answer() -> None:
    plugin = ScriptPlugin()
    config = ("processors: [{plugin: script, config: {phases: [request_headers, response_headers], "
              "set: {x-a: '1'}}}]")  # both phases needed: no mode_override copy
    first = await scripted_stream(plugin, config)
    [one] = await first.feed(headers_message(REQUEST, modes=("none", "none")))
    [two] = await ExtprocStream(first._policies).feed(headers_message(REQUEST, modes=("none", "none")))
    assert one is two and len(plugin.processed) == 2  # the hook ran twice; the answer was built once
    assert set_headers(common(one).header_mutation) == [("x-a", b"1", False)]


class _Numbered(Processor):
    """Sets x-n to a new number on every request: answers that keep differing."""

    def __init__(self, config: BaseModel, ctx: PluginContext) -> None:
        self._count = itertools.count()

    async def on_request_headers(self, message: HttpMessage, /) -> None:
        message.set_header("x-n", str(next(self._count)))


class _NumberedPlugin:
    @hookimpl
    def extsvc_register_processors(self) -> Iterator[ProcessorType[Any]]:
        yield ProcessorType(name="numbered", config_model=_NoConfig, factory=_Numbered)


class _NoConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


async def test_answers_that_keep_differing_are_right_and_stop_being_remembered() -> None:
    host = PluginHost.create(extra_plugins=[("numbered", _NumberedPlugin())], load_entry_points=False)
    first = await stream_for(
        "extproc:\n  default_policy: p\n  policies:\n    p:\n      processors: [{plugin: numbered}]\n",
        host=host,
    )
    policies = first._policies
    assert policies is not None
    seen = []
    for _ in range(ANSWER_MEMO_SIZE + 10):
        [answer] = await ExtprocStream(policies).feed(headers_message(REQUEST, modes=("none", "none")))
        [(name, value, _)] = set_headers(common(answer).header_mutation)
        seen.append((name, value))
    assert seen == [("x-n", str(n).encode()) for n in range(ANSWER_MEMO_SIZE + 10)]
    assert policies.policies["p"].answers[Phase.REQUEST_HEADERS.number] is None
