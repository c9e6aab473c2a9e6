"""``extsvc-controller render -f PATH... [-o FILE]`` and ``extsvc-controller explain -f PATH... ROUTE``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from . import render
from .sources.files import ManifestError, load
from .translate import Options, Translation, translate

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="extsvc-controller", description="kgateway GatewayExtension/TrafficPolicy -> Envoy config"
    )
    sub = parser.add_subparsers(dest="command", required=True)
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
            required=True,
            type=Path,
            help="manifest file or directory (repeatable)",
        )
        p.add_argument("--endpoints", type=Path, help="YAML: Service/listener/admin address overrides")
        p.add_argument("--cluster-domain", default="cluster.local")
        p.add_argument(
            "--strict-reference-grants",
            action="store_true",
            help="require a ReferenceGrant for a TrafficPolicy -> GatewayExtension in another namespace",
        )
    render_p = sub.choices["render"]
    render_p.add_argument("-o", "--output", type=Path, help="bootstrap file (default: stdout)")
    render_p.add_argument("--status", type=Path, help="write the statuses here instead of stderr")
    render_p.add_argument(
        "--secret-dir",
        help="write TLS certificates and keys under DIR/<ns>/<secret>/ and refer to them by path "
        "(default: inline in the bootstrap)",
    )
    sub.choices["explain"].add_argument(
        "route",
        help="NAMESPACE/NAME or NAME of an HTTPRoute, optionally followed by /RULE (rule name or index)",
    )
    return parser


def _translate(args: argparse.Namespace) -> Translation:
    base = Options(
        cluster_domain=args.cluster_domain,
        strict_reference_grants=args.strict_reference_grants,
        secret_dir=getattr(args, "secret_dir", None),
    )
    options = render.load_endpoints(args.endpoints, base)
    return translate(load(args.paths), options)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        translation = _translate(args)
    except (ManifestError, ValueError, OSError) as exc:
        print(f"extsvc-controller: {exc}", file=sys.stderr)
        return 2
    if args.command == "render":
        text = render.bootstrap_yaml(translation)
        render.write_files(translation)
        if args.output:
            args.output.write_text(text, encoding="utf-8")
        else:
            sys.stdout.write(text)
        statuses = render.statuses_yaml(translation.statuses)
        if args.status:
            args.status.write_text(statuses, encoding="utf-8")
        else:
            sys.stderr.write(statuses)
        return 0 if translation.ok else 1
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
        print(
            f"extsvc-controller: no attached HTTPRoute {ns}/{name}" + (f" rule {rule}" if rule else ""),
            file=sys.stderr,
        )
        return 1
    sys.stdout.write(render.explain_text(entries))
    return 0
