"""Config: YAML -> model -> compiled runtime; errors name the field path; `extsvc validate`."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel

from extsvc import AuthorizerType, hookimpl
from extsvc.authz.pipeline import CompiledPolicy
from extsvc.cli import main
from extsvc.config.model import Combine, OnError
from extsvc.errors import ConfigError
from extsvc.observability.metrics import Metrics
from extsvc.plugin.host import PluginHost
from extsvc.reload.compile import check_plugins, compile_config, parse, validate_file
from extsvc.reload.provider import embedded_default_config
from extsvc.reload.runtime import Runtime
from extsvc.testing import ScriptPlugin

from .conftest import CompileYaml

DEMO_PATH = Path(__file__).resolve().parents[2] / "extsvc" / "default_config.yaml"


class EmptyConfig(BaseModel, frozen=True, extra="forbid"):
    pass


def problems_of(text: str, host: PluginHost) -> list[str]:
    """Every problem parse + plugin validation reports for ``text``."""
    with pytest.raises(ConfigError) as info:
        check_plugins(parse(text), host)
    return info.value.problems


# -- the demo config -----------------------------------------------------------------------------


def test_the_embedded_demo_config_is_the_packaged_file() -> None:
    assert embedded_default_config() == DEMO_PATH.read_text(encoding="utf-8")


async def test_the_demo_config_parses_and_compiles(host: PluginHost, metrics: Metrics) -> None:
    config = parse(embedded_default_config())
    assert config.default_policy == "demo"
    assert set(config.policies) == {"demo", "allow-all", "deny-all"}
    demo = config.policies["demo"]
    assert demo.combine is Combine.FIRST_DECISIVE
    assert demo.on_error is OnError.DENY
    assert [s.label for s in demo.steps] == [
        "public-paths", "block-admin", "require-demo-user", "tag-request",
    ]
    runtime = await compile_config(config, host, metrics, generation=7)
    assert runtime.generation == 7
    policy = runtime.policies["demo"]
    assert isinstance(policy, CompiledPolicy)
    assert [(s.label, s.kind) for s in policy.steps] == [
        ("public-paths", "header-match"),
        ("block-admin", "header-match"),
        ("require-demo-user", "header-match"),
        ("tag-request", "set-headers"),
    ]
    assert len(runtime.authorizers) == 6  # 4 demo steps + allow-all + deny-all
    # the defaults of a policy that does not set them
    allow_all = runtime.policies["allow-all"]
    assert allow_all.default_decision.status == 403
    assert allow_all.error_decision.status == 503
    assert allow_all.timeout_s is None


@pytest.mark.parametrize("text", ["", "   \n", "# only a comment\n"])
def test_an_empty_file_is_rejected(text: str) -> None:
    # What a file watcher sees between an editor's truncate and write: never a config to serve.
    with pytest.raises(ConfigError, match="the config is empty"):
        parse(text, source="policies.yaml")


def test_a_config_with_no_policies_is_valid() -> None:
    config = parse("version: 1\n")
    assert config.policies == {}
    assert config.default_policy is None


def test_step_label_defaults_to_the_plugin_kind() -> None:
    config = parse("policies: {p: {steps: [{plugin: allow}, {plugin: deny, name: last}]}}")
    assert [s.label for s in config.policies["p"].steps] == ["allow", "last"]


def test_policy_fields_are_read() -> None:
    config = parse(
        """
        policies:
          p:
            combine: any-allow
            on_error: envoy
            timeout_ms: 250
            default_reply: {status: 401, body: "who?", headers: {WWW-Authenticate: Basic}}
            error_reply: {status: 502}
            steps: [{plugin: allow}]
        """
    )
    policy = config.policies["p"]
    assert policy.combine is Combine.ANY_ALLOW
    assert policy.on_error is OnError.ENVOY
    assert policy.timeout_ms == 250
    assert policy.default_reply.headers == {"www-authenticate": "Basic"}  # names lower-cased
    assert policy.error_reply.status == 502


# -- errors name the field path ------------------------------------------------------------------


def test_unknown_plugin_kind(host: PluginHost) -> None:
    problems = problems_of("policies: {demo: {steps: [{plugin: allow}, {plugin: jwt-magic}]}}", host)
    assert len(problems) == 1
    assert problems[0].startswith("policies.demo.steps[1].plugin: unknown plugin kind 'jwt-magic'")
    assert (
        "known: allow, api-key, basic-auth, client-cidr, deny, header-match, jwt, "
        "oauth2-introspection, script, set-headers" in problems[0]
    )


def test_bad_plugin_config_field(host: PluginHost) -> None:
    problems = problems_of(
        "policies: {demo: {steps: [{plugin: allow}, {plugin: deny, config: {status: 42}}]}}", host
    )
    assert len(problems) == 1
    assert problems[0].startswith("policies.demo.steps[1].config.status: ")
    assert "greater than or equal to 200" in problems[0]


def test_extra_field_in_plugin_config(host: PluginHost) -> None:
    problems = problems_of("policies: {demo: {steps: [{plugin: deny, config: {stauts: 401}}]}}", host)
    assert problems == ["policies.demo.steps[0].config.stauts: Extra inputs are not permitted"]


def test_extra_field_in_the_server_config(host: PluginHost) -> None:
    problems = problems_of(
        "policies: {demo: {steps: [{plugin: allow, confg: {}}], retries: 3}}\nlisten: 1", host
    )
    assert sorted(problems) == sorted(
        [
            "policies.demo.steps[0].confg: Extra inputs are not permitted",
            "policies.demo.retries: Extra inputs are not permitted",
            "listen: Extra inputs are not permitted",
        ]
    )


def test_bad_combine(host: PluginHost) -> None:
    problems = problems_of("policies: {demo: {combine: majority, steps: [{plugin: allow}]}}", host)
    assert len(problems) == 1
    assert problems[0].startswith("policies.demo.combine: Input should be 'first-decisive'")


def test_bad_on_error(host: PluginHost) -> None:
    problems = problems_of("policies: {demo: {on_error: retry, steps: [{plugin: allow}]}}", host)
    assert problems[0].startswith("policies.demo.on_error: Input should be 'deny', 'allow' or 'envoy'")


def test_default_policy_not_a_policy(host: PluginHost) -> None:
    problems = problems_of("default_policy: demo2\npolicies: {demo: {steps: [{plugin: allow}]}}", host)
    assert len(problems) == 1
    assert "default_policy: 'demo2' is not one of policies (demo)" in problems[0]


def test_authority_policy_not_a_policy(host: PluginHost) -> None:
    problems = problems_of(
        "authority_policies: {api.example: nope}\npolicies: {demo: {steps: [{plugin: allow}]}}", host
    )
    assert "authority_policies.api.example: 'nope' is not one of policies" in problems[0]


def test_bad_header_name_in_a_reply(host: PluginHost) -> None:
    problems = problems_of(
        "policies: {demo: {steps: [{plugin: allow}], default_reply: {headers: {'Bad Header': x}}}}",
        host,
    )
    assert len(problems) == 1
    assert problems[0].startswith("policies.demo.default_reply.headers.")
    assert "invalid header name 'Bad Header'" in problems[0]


def test_bad_header_value_in_a_plugin_reply(host: PluginHost) -> None:
    problems = problems_of(
        'policies: {demo: {steps: [{plugin: deny, config: {headers: {x-a: "1\\r\\nx-b: 2"}}}]}}', host
    )
    assert len(problems) == 1
    assert problems[0].startswith("policies.demo.steps[0].config.headers.x-a: ")
    assert "CR, LF or NUL" in problems[0]


def test_bad_reply_status(host: PluginHost) -> None:
    problems = problems_of(
        "policies: {demo: {steps: [{plugin: allow}], error_reply: {status: 700}}}", host
    )
    assert problems[0].startswith("policies.demo.error_reply.status: ")


def test_invalid_regex_in_header_match(host: PluginHost) -> None:
    problems = problems_of(
        """
        policies:
          demo:
            steps:
              - plugin: header-match
                config: {match: {path: {regex: "/api/(v1"}}}
        """,
        host,
    )
    assert len(problems) == 1
    assert problems[0].startswith("policies.demo.steps[0].config.match.path.regex: ")
    assert "invalid regular expression '/api/(v1'" in problems[0]


def test_yaml_syntax_error() -> None:
    with pytest.raises(ConfigError) as info:
        parse("policies: {demo: [", source="bad.yaml")
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith("bad.yaml: not valid YAML: ")
    assert "line 1" in info.value.problems[0]


def test_a_yaml_error_points_at_the_line_with_a_caret() -> None:
    # libyaml parses; a broken file is parsed again by PyYAML for its excerpt of the line
    with pytest.raises(ConfigError) as info:
        parse("policies:\n  p:\n    steps: [{plugin: allow}\n  q: 1\n", source="bad.yaml")
    assert "line 4, column 3:\n      q: 1\n      ^" in info.value.problems[0]


def test_aliases_may_add_values_up_to_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    from extsvc import safeyaml

    monkeypatch.setattr(safeyaml, "MAX_ALIAS_NODES", 60)
    # `&s` is a list of one mapping of 2 pairs: 6 values; each further use adds them again
    uses = "".join(f"  p{i}: {{steps: *s}}\n" for i in range(1, 11))
    text = "policies:\n  p0: {steps: &s [{plugin: allow, name: a}]}\n" + uses
    assert len(parse(text).policies) == 11  # 10 uses x 6 values = 60: allowed
    with pytest.raises(ConfigError) as info:
        parse(text + "  p11: {steps: *s}\n", source="c.yaml")
    assert info.value.problems[0].startswith(
        "c.yaml: refused: aliases (*name) expand to 66 more values than the file writes, more "
        "than the 60 allowed"
    )


@pytest.mark.parametrize(("text", "kind"), [("- a\n- b\n", "list"), ("just text", "str"), ("42", "int")])
def test_top_level_not_a_mapping(text: str, kind: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(text, source="c.yaml")
    assert info.value.problems == [f"c.yaml: the top level must be a mapping, got {kind}"]


def test_policy_without_steps(host: PluginHost) -> None:
    problems = problems_of("policies: {demo: {steps: []}}", host)
    assert problems[0].startswith("policies.demo.steps: List should have at least 1 item")


def test_all_model_problems_are_reported_at_once(host: PluginHost) -> None:
    problems = problems_of(
        """
        policies:
          a: {combine: nope, steps: [{plugin: allow}]}
          b: {steps: [{plugin: allow}], timeout_ms: 0}
          c: {steps: [{plugin: ""}]}
        """,
        host,
    )
    assert [p.split(":")[0] for p in problems] == [
        "policies.a.combine", "policies.b.timeout_ms", "policies.c.steps[0].plugin",
    ]


def test_all_plugin_problems_are_reported_at_once(host: PluginHost) -> None:
    problems = problems_of(
        """
        policies:
          a:
            steps:
              - {plugin: nope}
              - {plugin: deny, config: {status: 1, bogus: true}}
          b:
            steps:
              - {plugin: header-match, config: {match: {path: {prefix: /a, exact: /b}}}}
              - {plugin: set-headers, config: {remove_upstream: [":path"]}}
        """,
        host,
    )
    where = [p.split(": ")[0] for p in problems]
    assert where == [
        "policies.a.steps[0].plugin",
        "policies.a.steps[1].config.status",
        "policies.a.steps[1].config.bogus",
        "policies.b.steps[0].config.match.path",
        "policies.b.steps[1].config.remove_upstream",
    ]
    assert "set exactly one of exact, prefix, regex" in problems[3]


async def test_compile_config_checks_plugins_first(host: PluginHost, metrics: Metrics) -> None:
    with pytest.raises(ConfigError) as info:
        await compile_config(parse("policies: {p: {steps: [{plugin: nope}]}}"), host, metrics)
    assert info.value.problems[0].startswith("policies.p.steps[0].plugin: unknown plugin kind")


async def test_a_factory_that_raises_is_named(metrics: Metrics) -> None:
    class Exploding:
        @hookimpl
        def extsvc_register_authorizers(self) -> list[AuthorizerType[EmptyConfig]]:
            def factory(config: EmptyConfig, ctx: object) -> object:
                raise ValueError("key file missing")

            return [AuthorizerType(name="exploding", config_model=EmptyConfig, factory=factory)]

    class NotAnAuthorizer:
        @hookimpl
        def extsvc_register_authorizers(self) -> list[AuthorizerType[EmptyConfig]]:
            return [
                AuthorizerType(name="no-check", config_model=EmptyConfig, factory=lambda c, x: object())
            ]

    host = PluginHost.create(
        extra_plugins=[("x", Exploding()), ("y", NotAnAuthorizer())], load_entry_points=False
    )
    with pytest.raises(ConfigError) as info:
        await compile_config(parse("policies: {p: {steps: [{plugin: exploding}]}}"), host, metrics)
    assert info.value.problems == [
        "policies.p.steps[0]: plugin 'exploding' failed to build: key file missing"
    ]
    with pytest.raises(ConfigError) as info:
        await compile_config(parse("policies: {p: {steps: [{plugin: no-check}]}}"), host, metrics)
    assert "policies.p.steps[0]: plugin 'no-check' built object" in info.value.problems[0]


async def test_compile_starts_steps_and_binds_plugin_context(
    compile_yaml: CompileYaml, script: ScriptPlugin
) -> None:
    runtime = await compile_yaml(
        "policies: {p: {steps: [{plugin: script, name: first}, {plugin: script}]}}"
    )
    assert isinstance(runtime, Runtime)
    first, second = script.built
    assert first.started and second.started
    assert (first.ctx.plugin, first.ctx.policy, first.ctx.step) == ("script", "p", "first")
    assert second.ctx.step == "script"
    assert first.ctx.logger.name == "extsvc.plugin.script"


async def test_validate_file_does_not_start_steps(
    tmp_path: Path, host: PluginHost, script: ScriptPlugin
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("policies: {p: {steps: [{plugin: script, config: {fail_start: true}}]}}")
    runtime = await validate_file(path, host)
    assert set(runtime.policies) == {"p"}
    assert script.built[0].started is False


async def test_validate_file_reports_an_unreadable_file(tmp_path: Path, host: PluginHost) -> None:
    with pytest.raises(ConfigError) as info:
        await validate_file(tmp_path / "missing.yaml", host)
    assert info.value.problems[0].startswith(f"{tmp_path / 'missing.yaml'}: cannot read: ")


# -- `extsvc validate` ---------------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("EXTSVC_PLUGINS_ALLOW", "EXTSVC_PLUGINS_BLOCK"):
        monkeypatch.delenv(key, raising=False)


@pytest.mark.usefixtures("clean_env")
def test_validate_cli_accepts_the_demo_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(DEMO_PATH)]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == [
        f"{DEMO_PATH}: OK",
        "  ext_authz: 3 policies: allow-all, demo, deny-all; default: demo",
        "  ext_proc: 1 policies: demo; default: demo",
        "  ratelimit: 1 domains: demo; store: memory",
    ]
    assert err == ""


@pytest.mark.usefixtures("clean_env")
def test_validate_cli_lists_every_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        """
        policies:
          demo:
            steps:
              - {plugin: nope}
              - {plugin: deny, config: {status: 42}}
        """
    )
    assert main(["validate", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert lines[0] == f"{path}: 2 problem(s)"
    assert lines[1].startswith("  policies.demo.steps[0].plugin: unknown plugin kind 'nope'")
    assert lines[2].startswith("  policies.demo.steps[1].config.status: ")


@pytest.mark.usefixtures("clean_env")
def test_validate_cli_knows_entry_point_kinds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "tenant.yaml"
    path.write_text("policies: {t: {steps: [{plugin: tenant-header, config: {allowed: [acme]}}]}}")
    assert main(["validate", str(path)]) == 0
    assert "ext_authz: 1 policies: t; default: none" in capsys.readouterr().out


def test_validate_cli_honours_the_block_list(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("EXTSVC_PLUGINS_ALLOW", raising=False)
    monkeypatch.setenv("EXTSVC_PLUGINS_BLOCK", "acme")
    path = tmp_path / "tenant.yaml"
    path.write_text("policies: {t: {steps: [{plugin: tenant-header, config: {allowed: [acme]}}]}}")
    assert main(["validate", str(path)]) == 1
    assert "unknown plugin kind 'tenant-header'" in capsys.readouterr().err


@pytest.mark.usefixtures("clean_env")
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("policies: [", "not valid YAML"),
        ("- 1", "the top level must be a mapping, got list"),
        ("default_policy: x", "default_policy: 'x' is not one of policies (none defined)"),
    ],
)
def test_validate_cli_reports_file_level_problems(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, expected: str
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    assert main(["validate", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"{path}: 1 problem(s)\n")
    assert expected in err


@pytest.mark.usefixtures("clean_env")
def test_validate_cli_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(tmp_path / "nope.yaml")]) == 1
    assert "cannot read" in capsys.readouterr().err


@pytest.mark.usefixtures("clean_env")
def test_validate_reports_shape_plugin_build_and_domain_problems_in_one_pass(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # a bad `combine` (the file's shape) must not hide a misspelled kind further down
    shape = tmp_path / "shape.yaml"
    shape.write_text(
        "policies:\n"
        "  a: {combine: first-wins, steps: [{plugin: allow}]}\n"
        "  b: {steps: [{plugin: alow}, {plugin: deny, config: {status: 42}}]}\n"
        "extproc: {policies: {x: {processors: [{plugin: hedaers}]}}}\n"
    )
    assert main(["validate", str(shape)]) == 1
    err = capsys.readouterr().err
    assert f"{shape}: 4 problem(s)" in err
    assert "policies.a.combine: " in err
    assert "policies.b.steps[0].plugin: unknown plugin kind 'alow'" in err
    assert "policies.b.steps[1].config.status: " in err
    assert "extproc.policies.x.processors[0].plugin: unknown processor kind 'hedaers'" in err

    # files a step reads are read by validate (as by a reload): every missing one is named,
    # and so are the rate-limit domain files' problems
    (tmp_path / "domains").mkdir()
    (tmp_path / "domains" / "d.yaml").write_text("domain: d\ndescriptors: [{key: k, rate_limit: {}}]\n")
    files = tmp_path / "files.yaml"
    files.write_text(
        "policies:\n"
        "  j: {steps: [{plugin: jwt, config: {providers: [{name: idp, issuers: [i],"
        " audiences: [api], algorithms: [RS256], jwks_file: missing-jwks.json}]}}]}\n"
        "  k: {steps: [{plugin: api-key, config: {keys_file: missing-keys.json}}]}\n"
        "ratelimit: {config_dir: domains}\n"
    )
    assert main(["validate", str(files)]) == 1
    err = capsys.readouterr().err
    assert f"{files}: 3 problem(s)" in err
    assert "cannot load jwks_file missing-jwks.json: No such file or directory" in err
    assert "policies.k.steps[0]: plugin 'api-key' failed to build" in err
    assert "d.yaml: descriptors[0].rate_limit: unit is required" in err


@pytest.mark.usefixtures("clean_env")
def test_validate_summarises_long_lists_and_says_what_unmatched_requests_get(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "many.yaml"
    path.write_text(
        "policies:\n" + "".join(f"  p{i:04d}: {{steps: [{{plugin: allow}}]}}\n" for i in range(1000))
    )
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "  ext_authz: 1000 policies: p0000, p0001, " in out
    assert "p0009 and 990 more; default: none" in out
    assert "p0010" not in out
    # no default_policy and no extproc section: what requests that name no policy get
    assert "note: ext_authz: no default_policy: a request whose route names no policy" in out
    assert "note: extproc: no policies: ext_proc streams pass through unprocessed" in out
    assert main(["validate", "--verbose", str(path)]) == 0
    assert "p0999; default: none" in capsys.readouterr().out


@pytest.mark.usefixtures("clean_env")
def test_validate_says_a_binary_file_is_not_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    assert main(["validate", str(path)]) == 1
    err = capsys.readouterr().err
    assert "not a text file (byte 0 is not UTF-8)" in err and "invalid settings" not in err


def test_an_unknown_kind_names_plugins_installed_after_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    from importlib.metadata import EntryPoint

    from extsvc.plugin import host as host_module
    from extsvc.reload.compile import parse_checked

    host = PluginHost.create()
    assert host.entry_points_added() == []
    before = host_module._entry_points()
    late = EntryPoint(name="late", value="late_extsvc.plugin", group="extsvc")
    monkeypatch.setattr(host_module, "_entry_points", lambda: [*before, late])
    with pytest.raises(ConfigError) as info:
        parse_checked("policies: {p: {steps: [{plugin: late-kind}]}}", host)
    assert info.value.problems == [
        "policies.p.steps[0].plugin: unknown plugin kind 'late-kind' (known: "
        + ", ".join(sorted(host.authorizers))
        + "); plugin package(s) installed after start-up: late (late_extsvc.plugin): "
        "restart extsvc to load them"
    ]


def test_every_cli_flag_has_help_and_the_environment_is_listed(capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from extsvc.cli import _parser
    from extsvc.settings import ENV_PREFIX, Settings

    def walk(parser: argparse.ArgumentParser, path: str) -> list[str]:
        missing = []
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    missing += walk(sub, f"{path} {name}")
            elif not isinstance(action, (argparse._HelpAction, argparse._VersionAction)) and not action.help:
                missing.append(f"{path} {action.dest}")
        return missing

    assert walk(_parser(), "extsvc") == []
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    for name in Settings.model_fields:
        assert f"{ENV_PREFIX}{name.upper()} " in out
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith("extsvc 0.")
