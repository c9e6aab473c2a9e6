"""``extsvc-controller run``: its options, checked before anything starts (exit code 2, one line)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys
from pathlib import Path

from .results import Options

PROG = "extsvc-controller"


def hostport(option: str, text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{option} {text}: expected HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)  # noqa: S104 (no host: every address)


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    text = "serve xDS to Envoy from a watched folder of manifests or the Kubernetes API"
    p = sub.add_parser("run", help=text, description=text)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "-f", "--filename", dest="paths", action="append", type=Path, metavar="PATH",
        help="folder mode: manifest file or directory, watched (repeatable)",
    )
    src.add_argument("--kubernetes", action="store_true", help="Kubernetes mode: list and watch the API")
    p.add_argument("--kubeconfig", type=Path, metavar="FILE",
                   help="Kubernetes mode: a kubeconfig (default: in-cluster, then ~/.kube/config)")
    p.add_argument("--namespace", dest="namespaces", action="append", default=[], metavar="NS",
                   help="Kubernetes mode: watch only these namespaces (repeatable; default: all)")
    p.add_argument("--xds-address", default="0.0.0.0:18000", metavar="HOST:PORT",
                   help="where Envoys connect for ADS (default: %(default)s)")
    p.add_argument("--xds-tls-cert", type=Path, metavar="FILE",
                   help="serve ADS over TLS with this certificate (PEM; with --xds-tls-key)")
    p.add_argument("--xds-tls-key", type=Path, metavar="FILE", help="the key of --xds-tls-cert (PEM)")
    p.add_argument("--xds-tls-client-ca", type=Path, metavar="FILE",
                   help="require Envoys to present a client certificate signed by this CA (mutual TLS)")
    p.add_argument("--admin-address", default="0.0.0.0:9902", metavar="HOST:PORT",
                   help="/healthz, /readyz, /metrics (default: %(default)s)")
    p.add_argument("--endpoints", type=Path, metavar="FILE",
                   help="YAML: Service/listener address overrides, as for render")
    p.add_argument("--cluster-domain", default="cluster.local", metavar="DOMAIN",
                   help="DNS suffix of Service hostnames (default: %(default)s)")
    p.add_argument("--strict-reference-grants", action="store_true",
                   help="require a ReferenceGrant for a TrafficPolicy -> GatewayExtension "
                   "in another namespace")
    p.add_argument("--gateway-class", dest="gateway_classes", action="append", default=[],
                   metavar="NAME", help="serve and write only Gateways of this GatewayClass "
                   "(repeatable; default: every Gateway)")
    p.add_argument("--status", type=Path, metavar="FILE",
                   help="folder mode: keep the statuses in FILE (YAML, as render --status writes them)")
    p.add_argument("--poll-interval", type=float, default=1.0, metavar="S",
                   help="folder mode: seconds between looks at the files (default: %(default)s)")
    p.add_argument("--debounce", type=float, default=0.05, metavar="S",
                   help="seconds of quiet after a change before a snapshot is built (default: %(default)s)")
    p.add_argument("--controller-name", default="extsvc.dev/controller", metavar="NAME",
                   help="the controllerName written in route and policy statuses (default: %(default)s)")
    p.add_argument("--no-leader-election", dest="leader_election", action="store_false",
                   help="Kubernetes mode: write statuses without holding the Lease (one replica only)")
    p.add_argument("--lease-namespace", default=os.environ.get("POD_NAMESPACE", "default"), metavar="NS",
                   help="Kubernetes mode: namespace of the leader Lease (default: $POD_NAMESPACE or default)")
    p.add_argument("--lease-name", default="extsvc-controller", metavar="NAME",
                   help="Kubernetes mode: name of the leader Lease (default: %(default)s)")
    p.add_argument("--identity", default=os.environ.get("POD_NAME", ""), metavar="ID",
                   help="Kubernetes mode: this replica's Lease identity (default: $POD_NAME or host-pid)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="what is logged (default: %(default)s)")


def main(args: argparse.Namespace) -> int:
    from . import render
    from .serve import RunConfig, XdsServerTls, main_async
    from .sources.files import ManifestError

    logging.basicConfig(
        level=args.log_level.upper(), stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for chatty in ("httpx", "httpx2", "httpcore"):  # a line per API request is not news
        logging.getLogger(chatty).setLevel(max(logging.WARNING, logging.getLogger().level))
    base = Options(
        cluster_domain=args.cluster_domain,
        strict_reference_grants=args.strict_reference_grants,
        gateway_classes=tuple(args.gateway_classes),
    )
    try:
        options = render.load_endpoints(args.endpoints, base)
    except (ManifestError, ValueError) as exc:
        print(f"{PROG}: --endpoints {exc}", file=sys.stderr)
        return 2
    for path in args.paths or []:
        if not path.exists():
            print(f"{PROG}: -f {path}: no such file or directory", file=sys.stderr)
            return 2
    try:
        xds_address = hostport("--xds-address", args.xds_address)
        admin_address = hostport("--admin-address", args.admin_address)
    except ValueError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    if (args.xds_tls_cert is None) != (args.xds_tls_key is None) or (
        args.xds_tls_client_ca is not None and args.xds_tls_cert is None
    ):
        print(f"{PROG}: --xds-tls-cert and --xds-tls-key go together "
              "(and --xds-tls-client-ca needs them)", file=sys.stderr)
        return 2
    xds_tls = None
    if args.xds_tls_cert is not None:
        try:
            xds_tls = XdsServerTls.read(args.xds_tls_cert, args.xds_tls_key, args.xds_tls_client_ca)
        except OSError as exc:
            print(f"{PROG}: --xds-tls-*: {exc.filename}: {(exc.strerror or str(exc)).lower()}",
                  file=sys.stderr)
            return 2
    config = RunConfig(
        paths=list(args.paths or []),
        kubernetes=args.kubernetes,
        kubeconfig=args.kubeconfig,
        namespaces=list(args.namespaces),
        options=options,
        xds_address=xds_address,
        xds_tls=xds_tls,
        admin_address=admin_address,
        status_file=args.status,
        poll_interval_s=args.poll_interval,
        debounce_s=args.debounce,
        controller_name=args.controller_name,
        leader_election=args.leader_election,
        lease_namespace=args.lease_namespace,
        lease_name=args.lease_name,
        identity=args.identity or f"{socket.gethostname()}-{os.getpid()}",
    )
    try:
        return asyncio.run(main_async(config))
    except OSError as exc:  # a port in use
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
