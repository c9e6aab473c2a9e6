"""extsvc-controller's command line: unusable paths, stdin, warnings, explain's reasons, --version."""

from __future__ import annotations

import argparse
import io
import os
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

from extsvc_controller.cli import build_parser, main

from .test_golden import CASES, COMMON

PROG = "extsvc-controller"


def stderr_lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return capsys.readouterr().err.splitlines()


def stdin(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(text))


# --- 1. every unusable path: one line on stderr naming it and why, exit code 2 ----------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["-o", "{tmp}"], "--output {tmp}: is a directory, expected a file"),
        (
            ["-o", "{tmp}/missing/x.yaml"],
            "--output {tmp}/missing/x.yaml: directory {tmp}/missing does not exist",
        ),
        (
            ["--status", "{tmp}/missing/s.yaml"],
            "--status {tmp}/missing/s.yaml: directory {tmp}/missing does not exist",
        ),
        (["--status", "{tmp}"], "--status {tmp}: is a directory, expected a file"),
        (["-o", "{tmp}/file/x.yaml"], "--output {tmp}/file/x.yaml: {tmp}/file is not a directory"),
        (
            ["-o", "{tmp}/out.yaml", "--status", "{tmp}/out.yaml"],
            "--status {tmp}/out.yaml: the same file as --output",
        ),
        (["--secret-dir", "{tmp}/file"], "--secret-dir {tmp}/file: not a directory"),
        (["--endpoints", "{tmp}/missing.yaml"], "--endpoints {tmp}/missing.yaml: no such file or directory"),
        (["--endpoints", "{tmp}"], "--endpoints {tmp}: is a directory"),
        (["--endpoints", "{tmp}/bad.yaml"], "--endpoints {tmp}/bad.yaml: not valid YAML: "),
        (["--endpoints", "{tmp}/list.yaml"], "--endpoints {tmp}/list.yaml: expected a mapping"),
        (
            ["--endpoints", "{tmp}/services.yaml"],
            "--endpoints {tmp}/services.yaml: services: expected a mapping",
        ),
        (["-f", "{tmp}/missing.yaml"], "{tmp}/missing.yaml: no such file or directory"),
        (["-f", "{tmp}/bad.yaml"], "{tmp}/bad.yaml: not valid YAML: "),
        (["-f", "{tmp}/binary.yaml"], "{tmp}/binary.yaml: not UTF-8 text"),
    ],
)
def test_unusable_path_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], expected: str
) -> None:
    (tmp_path / "file").write_text("")
    (tmp_path / "bad.yaml").write_text("a: [\n")
    (tmp_path / "list.yaml").write_text("[1, 2]\n")
    (tmp_path / "services.yaml").write_text("services: [a]\n")
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00")
    argv = ["render", "-f", str(COMMON), *(a.format(tmp=tmp_path) for a in args)]
    assert main(argv) == 2
    lines = stderr_lines(capsys)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{PROG}: {expected.format(tmp=tmp_path)}"), lines[0]


def test_nothing_is_written_when_a_later_output_is_unusable(tmp_path: Path) -> None:
    out = tmp_path / "envoy.yaml"
    assert main(["render", "-f", str(COMMON), "-o", str(out), "--status", str(tmp_path / "no/s.yaml")]) == 2
    assert not out.exists()


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_failing_write_is_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["render", "-f", str(COMMON), "-o", "/dev/full"]) == 2
    assert stderr_lines(capsys) == [f"{PROG}: --output /dev/full: no space left on device"]


# --- 2. -f - reads stdin; kind: List -----------------------------------------------------------------


def test_filename_dash_reads_stdin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    stdin(monkeypatch, COMMON.read_text() + "---\n" + (CASES / "disable" / "input.yaml").read_text())
    out = tmp_path / "envoy.yaml"
    assert main(["render", "-f", "-", "-o", str(out)]) == 0
    assert out.read_text() == (CASES / "disable" / "envoy.yaml").read_text()
    assert "warning" not in capsys.readouterr().err


def test_stdin_with_files(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    stdin(monkeypatch, (CASES / "disable" / "input.yaml").read_text())
    assert main(["explain", "-f", str(COMMON), "-f", "-", "demo/shop/public"]) == 0
    assert "runs global_disable/ext_auth" in capsys.readouterr().out


def test_kubectl_list_on_stdin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What ``kubectl get ... -o yaml`` prints for several objects: one ``kind: List``."""
    items = [
        d for f in (COMMON, CASES / "disable" / "input.yaml") for d in yaml.safe_load_all(f.read_text()) if d
    ]
    stdin(monkeypatch, yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": items, "metadata": {}}))
    out = tmp_path / "envoy.yaml"
    assert main(["render", "-f", "-", "-o", str(out), "--status", str(tmp_path / "s.yaml")]) == 0
    assert out.read_text() == (CASES / "disable" / "envoy.yaml").read_text()


def test_typed_list_items_take_kind_from_the_list(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The API's ``GatewayList`` leaves kind and apiVersion out of its items."""
    docs = [d for d in yaml.safe_load_all(COMMON.read_text()) if d]
    gateways = [
        {k: v for k, v in d.items() if k not in ("kind", "apiVersion")}
        for d in docs
        if d["kind"] == "Gateway"
    ]
    rest = [d for d in docs if d["kind"] != "Gateway"]
    typed = {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "GatewayList", "items": gateways}
    stdin(monkeypatch, yaml.safe_dump_all([typed, *rest]))
    listed, direct = tmp_path / "listed.yaml", tmp_path / "direct.yaml"
    assert main(["render", "-f", "-", "-o", str(listed), "--status", str(tmp_path / "s.yaml")]) == 0
    assert main(["render", "-f", str(COMMON), "-o", str(direct), "--status", str(tmp_path / "s.yaml")]) == 0
    assert listed.read_text() == direct.read_text()
    assert "name: listener~80" in listed.read_text()


def test_unreadable_stdin_is_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    stdin(monkeypatch, "kind: [\n")
    assert main(["render", "-f", "-"]) == 2
    assert stderr_lines(capsys)[0].startswith(f"{PROG}: <stdin>: not valid YAML: ")


# --- 3. warnings: documents and --endpoints entries that are ignored --------------------------------

NOT_OBJECTS = """\
just a string
---
[1, 2]
---
{a: 1}
---
# only a comment: an empty document, skipped silently
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: demo}
---
apiVersion: v1
kind: List
items:
- {apiVersion: v1, kind: Namespace, metadata: {name: demo}}
- 3
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: ingress, namespace: demo}
spec: {servers: []}
"""


NOT_READ = "a kind extsvc-controller does not read; ignored"


def test_documents_that_are_not_read_are_warned_about(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    extra = tmp_path / "extra.yaml"
    extra.write_text(NOT_OBJECTS)
    status = tmp_path / "status.yaml"
    assert main(["render", "-f", str(COMMON), "-f", str(extra), "--status", str(status)]) == 0
    warnings = [line for line in stderr_lines(capsys) if line.startswith(f"{PROG}: warning: ")]
    assert [w.removeprefix(f"{PROG}: warning: ") for w in warnings] == [
        f"{extra}: document 1: not a Kubernetes object (a string); ignored",
        f"{extra}: document 2: not a Kubernetes object (a list); ignored",
        f"{extra}: document 3: not a Kubernetes object (no apiVersion or kind); ignored",
        f"{extra}: document 5: Deployment demo/web (apps/v1): {NOT_READ}",
        f"{extra}: document 6, item 1: Namespace demo (v1): {NOT_READ}",
        f"{extra}: document 6, item 2: not a Kubernetes object (a number); ignored",
        f"{extra}: document 7: Gateway demo/ingress (networking.istio.io/v1): {NOT_READ}",
    ]
    assert "name: ingress" not in status.read_text()  # not taken for a Gateway API Gateway


def test_endpoints_that_match_nothing_are_warned_about(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    endpoints = tmp_path / "endpoints.yaml"
    endpoints.write_text(
        "services:\n  demo/extsvc: 127.0.0.1:9001\n  demo/extsvc:9001: 127.0.0.1:9001\n"
        "  demo/nope: 127.0.0.1:1\n  demo/backend:1: 127.0.0.1:2\n  backend: 127.0.0.1:3\n"
        "listeners:\n  '80': 127.0.0.1:10000\n  demo/gw/internal: 127.0.0.1:10001\n"
        "  '81': 127.0.0.1:10002\n  demo/gw/nope: 127.0.0.1:10003\n"
    )
    args = ["render", "-f", str(COMMON), "--endpoints", str(endpoints), "-o", str(tmp_path / "envoy.yaml")]
    assert main([*args, "--status", str(tmp_path / "s.yaml")]) == 0
    assert stderr_lines(capsys) == [
        f"{PROG}: warning: --endpoints {endpoints}: {w}; ignored"
        for w in (
            "services: demo/nope: no Service demo/nope in the manifests",
            "services: demo/backend:1: Service demo/backend has no port 1",
            "services: backend: expected ns/name or ns/name:port",
            "listeners: 81: no Gateway listener on port 81 in the manifests",
            "listeners: demo/gw/nope: no Gateway listener demo/gw/nope in the manifests",
        )
    ]


def test_a_directory_without_yaml_is_warned_about(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["render", "-f", str(COMMON), "-f", str(empty), "-o", str(tmp_path / "e.yaml")]) == 0
    assert f"{PROG}: warning: {empty}: no *.yaml or *.yml file in this directory" in stderr_lines(capsys)


# --- 5. explain says why a route has no Envoy route ------------------------------------------------


def test_explain_on_a_replaced_gateway_says_why(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["explain", "-f", str(COMMON), "-f", str(CASES / "gateway-invalid" / "input.yaml"), "demo/shop"])
        == 1
    )
    assert stderr_lines(capsys) == [
        f"{PROG}: HTTPRoute demo/shop is not programmed: Gateway demo/gw was not accepted: GatewayReplaced: "
        "gateway.kgateway.dev/TrafficPolicy/demo/gw-bad: extauth: demo/missing: gateway extension not found "
        "(every route of the Gateway answers 500)"
    ]


def test_explain_on_conflicting_gateways_says_why(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    other = tmp_path / "other.yaml"
    other.write_text(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: aaa, namespace: demo}\n"
        "spec: {listeners: [{name: http, port: 80, protocol: HTTP}]}\n"
    )
    assert main(["explain", "-f", str(COMMON), "-f", str(other), "demo/shop"]) == 1
    assert stderr_lines(capsys) == [
        f"{PROG}: HTTPRoute demo/shop is not programmed: Gateway demo/gw was not accepted: "
        "ListenersNotValid: port 80: conflicting listeners (the listener is not created)"
    ]


@pytest.mark.parametrize(
    ("route", "why"),
    [
        ("shop", "no HTTPRoute default/shop in the manifests (found: demo/shop)"),
        ("demo/nothere", "no HTTPRoute demo/nothere in the manifests"),
        ("demo/shop/nope", "HTTPRoute demo/shop has no rule nope (rules: 0 (orders), 1 (public), 2 (rest))"),
    ],
)
def test_explain_names_what_is_missing(route: str, why: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "-f", str(COMMON), route]) == 1
    assert stderr_lines(capsys) == [f"{PROG}: {why}"]


def test_explain_on_a_route_without_parent(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    route = tmp_path / "route.yaml"
    route.write_text(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: lost, namespace: demo}\n"
        "spec: {parentRefs: [{name: elsewhere}], rules: [{backendRefs: [{name: backend, port: 8080}]}]}\n"
    )
    assert main(["explain", "-f", str(COMMON), "-f", str(route), "demo/lost"]) == 1
    assert stderr_lines(capsys) == [
        f"{PROG}: HTTPRoute demo/lost is not programmed: NoMatchingParent: no parent Gateway found; "
        "parent Gateway demo/elsewhere not found"
    ]


# --- 7. --version and a help string for every option -----------------------------------------------


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"{PROG} {version('extsvc')}\n"


def _parsers(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser]]:
    out = [(parser.prog, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                out += _parsers(sub)
    return out


def test_every_option_has_a_help_string() -> None:
    missing = [
        f"{prog}: {'/'.join(action.option_strings) or action.dest}"
        for prog, parser in _parsers(build_parser())
        for action in parser._actions
        if not isinstance(action, argparse._HelpAction) and not action.help
    ]
    assert not missing, missing
