"""``extsvc-controller render -f PATH... [-o FILE]`` and ``extsvc-controller explain -f PATH... ROUTE``.

Exit codes: 0 done; 1 an object is invalid (``render``) or the route has no Envoy route
(``explain``); 2 a path or an input that cannot be used, said in one line on stderr.
Warnings (documents skipped, ``--endpoints`` entries that match nothing) go to stderr as
``extsvc-controller: warning: ...`` lines and do not change the exit code.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import yaml

from . import diagnose, render, runcli
from .sources.files import ManifestError, Manifests, describe, read
from .translate import Options, Translation, translate

__all__ = ["build_parser", "main"]

PROG = "extsvc-controller"


class UsageError(Exception):
    """A path or input the command cannot use: exit code 2, the message on one line."""


def _version() -> str:
    try:
        return version("extsvc")
    except PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="kgateway GatewayExtension/TrafficPolicy -> Envoy config"
    )
    parser.add_argument(
        "--version", action="version", version=f"{PROG} {_version()}", help="print the version and exit"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help="what to do")
    for name, text in (
        ("render", "write a static Envoy bootstrap and print the statuses"),
        ("explain", "print the effective filter chain of an HTTPRoute (or one rule)"),
    ):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument(
            "-f",
            "--filename",
            dest="paths",
            action="append",
            default=[],
            type=Path,
            metavar="PATH",
            help="manifest file or directory, or - for stdin (repeatable)",
        )
        p.add_argument(
            "--endpoints",
            type=Path,
            metavar="FILE",
            help="YAML: Service/listener/admin address overrides",
        )
        p.add_argument(
            "--cluster-domain",
            default="cluster.local",
            metavar="DOMAIN",
            help="DNS suffix of Service hostnames: <svc>.<ns>.svc.DOMAIN (default: %(default)s)",
        )
        p.add_argument(
            "--strict-reference-grants",
            action="store_true",
            help="require a ReferenceGrant for a TrafficPolicy -> GatewayExtension in another namespace",
        )
    render_p = sub.choices["render"]
    render_p.add_argument(
        "-o", "--output", type=Path, metavar="FILE", help="bootstrap file (default: stdout)"
    )
    render_p.add_argument(
        "--status", type=Path, metavar="FILE", help="write the statuses here instead of stderr"
    )
    render_p.add_argument(
        "--secret-dir",
        metavar="DIR",
        help="write TLS certificates and keys under DIR/<ns>/<secret>/ and refer to them by path "
        "(default: inline in the bootstrap)",
    )
    xds = render_p.add_argument_group("xDS bootstrap (for `run`; no -f needed)")
    xds.add_argument(
        "--xds", metavar="HOST:PORT",
        help="write the minimal bootstrap of an Envoy fed by `extsvc-controller run` at HOST:PORT",
    )
    xds.add_argument("--gateway", metavar="NS/NAME", help="the Gateway this Envoy serves")
    xds.add_argument("--node-id", metavar="ID", help="the Envoy node id (default: the Gateway, with ~)")
    xds.add_argument("--delta", action="store_true", help="incremental xDS (DELTA_GRPC)")
    xds.add_argument("--admin", metavar="HOST:PORT", default="127.0.0.1:9901",
                     help="Envoy's admin address (default: %(default)s)")
    xds.add_argument("--xds-ca", type=Path, metavar="FILE", help="TLS to the ADS server: CA file")
    xds.add_argument("--xds-cert", type=Path, metavar="FILE", help="... client certificate")
    xds.add_argument("--xds-key", type=Path, metavar="FILE", help="... client key")
    runcli.add_parser(sub)
    crds_p = sub.add_parser(
        "crds", help="print the GatewayExtension and TrafficPolicy CRDs (kubectl apply -f -)",
        description="print the GatewayExtension and TrafficPolicy CustomResourceDefinitions "
        "(gateway.kgateway.dev/v1alpha1) with the schema of the fields extsvc-controller translates",
    )
    crds_p.add_argument("-o", "--output", type=Path, metavar="FILE", help="write here (default: stdout)")
    sub.choices["explain"].add_argument(
        "route",
        help="NAMESPACE/NAME or NAME of an HTTPRoute, optionally followed by /RULE (rule name or index)",
    )
    return parser


def _output_problem(path: Path) -> str | None:
    """Why a file cannot be written at ``path`` (None: it probably can)."""
    if path.is_dir():
        return "is a directory, expected a file"
    parent = path.parent
    if not parent.exists():
        return f"directory {parent} does not exist"
    if not parent.is_dir():
        return f"{parent} is not a directory"
    if path.exists() and not os.access(path, os.W_OK):
        return "permission denied"
    if not path.exists() and not os.access(parent, os.W_OK | os.X_OK):
        return f"permission denied: cannot create a file in {parent}"
    return None


def _check_outputs(args: argparse.Namespace) -> None:
    """Refuse unusable output paths before anything is written."""
    for option, path in (("--output", args.output), ("--status", args.status)):
        problem = _output_problem(path) if path is not None else None
        if problem:
            raise UsageError(f"{option} {path}: {problem}")
    if args.output is not None and args.status is not None and args.output.resolve() == args.status.resolve():
        raise UsageError(f"--status {args.status}: the same file as --output")
    if args.secret_dir is not None:
        secret_dir = Path(args.secret_dir)
        if secret_dir.exists() and not secret_dir.is_dir():
            raise UsageError(f"--secret-dir {secret_dir}: not a directory")


def _read(args: argparse.Namespace) -> tuple[Manifests, Options, Translation]:
    if args.command == "render":
        _check_outputs(args)
    try:
        manifests = read(args.paths, sys.stdin)
    except ManifestError as exc:
        raise UsageError(str(exc)) from exc
    base = Options(
        cluster_domain=args.cluster_domain,
        strict_reference_grants=args.strict_reference_grants,
        secret_dir=getattr(args, "secret_dir", None),
    )
    try:
        options = render.load_endpoints(args.endpoints, base)
    except (ManifestError, ValueError) as exc:
        raise UsageError(f"--endpoints {exc}") from exc
    try:
        translation = translate(manifests.snapshot, options)
    except ValueError as exc:  # e.g. a Secret whose data is not base64
        raise UsageError(str(exc)) from exc
    return manifests, options, translation


def _write(option: str, path: Path, text: str) -> None:
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"{option} {path}: {describe(exc)}") from exc


def _render(args: argparse.Namespace, translation: Translation) -> int:
    text = render.bootstrap_yaml(translation)
    try:
        render.write_files(translation)
    except OSError as exc:
        raise UsageError(
            f"--secret-dir {args.secret_dir}: {exc.filename or args.secret_dir}: {describe(exc)}"
        ) from exc
    if args.output:
        _write("--output", args.output, text)
    else:
        sys.stdout.write(text)
    statuses = render.statuses_yaml(translation.statuses)
    if args.status:
        _write("--status", args.status, statuses)
    else:
        sys.stderr.write(statuses)
    return 0 if translation.ok else 1


def _explain(args: argparse.Namespace, manifests: Manifests, translation: Translation) -> int:
    parts = args.route.split("/")
    ns, name, rule = (
        ("default", parts[0], None)
        if len(parts) == 1
        else ((parts[0], parts[1], parts[2] if len(parts) > 2 else None))
    )
    entries = [
        e
        for e in sorted(translation.explain, key=lambda x: (x.route, x.rule, x.envoy_route))
        if e.route == f"{ns}/{name}" and (rule is None or rule in (e.rule_name, str(e.rule)))
    ]
    if not entries:
        reason = diagnose.not_programmed(manifests.snapshot, translation, ns, name, rule)
        print(f"{PROG}: {reason}", file=sys.stderr)
        return 1
    sys.stdout.write(render.explain_text(entries))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        return runcli.main(args)
    if args.command == "crds":
        from .crds import definitions

        text = yaml.safe_dump_all(definitions(), sort_keys=False)
        if args.output is None:
            sys.stdout.write(text)
        else:
            args.output.write_text(text, encoding="utf-8")
        return 0
    try:
        if args.command == "render" and args.xds:
            return _xds_bootstrap(args)
        if not args.paths:
            raise UsageError(f"{args.command}: -f/--filename is required")
        manifests, options, translation = _read(args)
        warnings = [*manifests.warnings]
        warnings += [
            f"--endpoints {args.endpoints}: {w}"
            for w in render.endpoint_warnings(manifests.snapshot, options)
        ]
        for warning in warnings:
            print(f"{PROG}: warning: {warning}", file=sys.stderr)
        if args.command == "render":
            return _render(args, translation)
        return _explain(args, manifests, translation)
    except UsageError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2


def _xds_bootstrap(args: argparse.Namespace) -> int:
    """``render --xds``: the bootstrap of an Envoy that gets everything else over ADS."""
    from .xds.bootstrap import ads_bootstrap

    if not args.gateway or args.gateway.count("/") != 1:
        raise UsageError("--xds needs --gateway NAMESPACE/NAME (the Gateway this Envoy serves)")
    tls_files = (args.xds_ca, args.xds_cert, args.xds_key)
    if any(tls_files) and not all(tls_files):
        raise UsageError("--xds-ca, --xds-cert and --xds-key go together")
    try:
        xds_host, xds_port = runcli.hostport("--xds", args.xds)
        admin = runcli.hostport("--admin", args.admin)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    if args.output is not None:
        problem = _output_problem(args.output)
        if problem:
            raise UsageError(f"--output {args.output}: {problem}")
    boot = ads_bootstrap(
        node_id=args.node_id or args.gateway.replace("/", "~"),
        gateway=args.gateway,
        xds_host=xds_host,
        xds_port=xds_port,
        admin=admin,
        delta=args.delta,
        tls=tuple(str(f) for f in tls_files) if all(tls_files) else None,  # type: ignore[arg-type]
    )
    text = "# Generated by extsvc-controller render --xds; do not edit.\n" + yaml.safe_dump(
        boot, sort_keys=False
    )
    if args.output:
        _write("--output", args.output, text)
    else:
        sys.stdout.write(text)
    return 0
