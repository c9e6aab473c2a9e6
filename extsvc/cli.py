"""``extsvc serve | validate FILE | plugins list | default-config | demo``."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from extsvc.errors import ConfigError, PluginError
from extsvc.settings import Settings

log = logging.getLogger("extsvc")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="extsvc", description="Envoy extension server (ext_authz, ext_proc, rate limit)"
    )
    parser.add_argument("--version", action="version", version=f"extsvc {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser(
        "serve", help="run the server",
        description="Serve ext_authz, ext_proc and the rate-limit service on one gRPC port. "
        "Flags override EXTSVC_* environment variables, which override the defaults.",
        epilog="environment variables:\n" + Settings.environment_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("--config", type=Path, help="policy file (default: the embedded demo)")
    serve.add_argument("--grpc-address", help="host:port for gRPC (default 0.0.0.0:9001)")
    serve.add_argument("--admin-address", help="host:port for /healthz /readyz /metrics "
                       "(default 127.0.0.1:9002)")
    serve.add_argument("--workers", type=int, help="processes sharing the gRPC port (default 1)")
    serve.add_argument("--grace-period", dest="grace_period_s", type=float,
                       help="seconds in-flight RPCs get on SIGTERM (default 10)")
    serve.add_argument("--drain-delay", dest="drain_delay_s", type=float,
                       help="seconds health is NOT_SERVING on SIGTERM before RPCs are refused "
                       "(default 5)")
    serve.add_argument("--reflection", action=argparse.BooleanOptionalAction, default=None,
                       help="serve gRPC reflection (default: on)")
    serve.add_argument("--reload-interval", dest="reload_interval_s", type=float,
                       help="seconds between config file checks (default 1)")
    serve.add_argument("--tls-cert", dest="tls_cert_file", type=Path,
                       help="PEM certificate: serve gRPC over TLS (with --tls-key)")
    serve.add_argument("--tls-key", dest="tls_key_file", type=Path,
                       help="PEM private key of --tls-cert")
    serve.add_argument("--tls-client-ca", dest="tls_client_ca_file", type=Path,
                       help="require client certificates signed by this CA (mTLS)")
    serve.add_argument("--event-loop", choices=("auto", "uvloop", "asyncio"),
                       help="auto (default): uvloop when installed, else asyncio")
    serve.add_argument("--log-level", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                       type=str.upper, help="default INFO")
    serve.add_argument("--log-format", choices=("text", "json"), help="default text")
    serve.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)

    validate = sub.add_parser(
        "validate", help="check a policy file offline; exit 1 on problems",
        description="Run what a reload runs -- parse, validate, build every step (reading the "
        "files they name) -- without serving or fetching anything, and report every problem.",
    )
    validate.add_argument("file", type=Path, help="the policy file")
    validate.add_argument("-v", "--verbose", action="store_true",
                          help="list every policy name (default: the first ten)")

    plugins = sub.add_parser("plugins", help="plugin information")
    plugins_sub = plugins.add_subparsers(dest="plugins_command", required=True)
    listing = plugins_sub.add_parser("list", help="what loaded and from where")
    listing.add_argument("--json", action="store_true", help="one JSON array instead of a table")

    sub.add_parser("default-config", help="print the embedded demo config")

    demo = sub.add_parser("demo", help="extsvc + a real Envoy + an echo backend on 127.0.0.1, "
                          "printing each request's decisions (Ctrl-C stops)")
    demo.add_argument("--port", type=int, default=10000,
                      help="Envoy's listener on 127.0.0.1 (default 10000)")
    for name, what in (("grpc", "extsvc's gRPC"), ("backend", "the echo backend's"),
                       ("envoy-admin", "Envoy's admin")):
        demo.add_argument(f"--{name}-port", type=int, default=0,
                          help=f"{what} port on 127.0.0.1 (default 0: any free port)")
    def stream_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--admin", metavar="HOST:PORT", help="the server's admin address "
                       "(default: $EXTSVC_ADMIN_ADDRESS, else 127.0.0.1:9002)")
        p.add_argument("--token-file", type=Path, help="admin token file (default: "
                       "$EXTSVC_ADMIN_TOKEN_FILE), when the server requires one")
        p.add_argument("--service", action="append", default=[],
                       choices=("ext_authz", "ext_proc", "ratelimit"), help="only this service "
                       "(repeatable)")
        p.add_argument("--policy", action="append", default=[], help="only this policy or "
                       "rate-limit domain (repeatable)")
        p.add_argument("--outcome", action="append", default=[], help="only this outcome: allow, "
                       "deny, error, over_limit, ok, immediate, ... (repeatable)")
        p.add_argument("--authority", default="", help="only requests to this :authority")
        p.add_argument("--path-prefix", default="", help="only paths starting with this")
        p.add_argument("--this-worker", action="store_true", help="with --workers N: only the "
                       "worker the connection reaches (default: all of them)")

    tail = sub.add_parser("tail", help="print a running server's decisions (-f: as they are made)")
    stream_options(tail)
    tail.add_argument("-f", "--follow", action="store_true", help="keep printing new decisions")
    tail.add_argument("-n", "--last", type=int, default=10,
                      help="first print up to this many recent decisions (default 10)")
    tail.add_argument("--json", action="store_true", help="one JSON object a line")
    tail.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                      help="colour the outcomes (auto: on a terminal)")
    top = sub.add_parser("top", help="per-policy rates, denial ratios and latency of a running "
                         "server, refreshed")
    stream_options(top)
    top.add_argument("--window", type=float, default=10.0, help="seconds summarised (default 10)")
    top.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    top.add_argument("--iterations", type=int, help="stop after this many refreshes")
    return parser


def _stream(args: argparse.Namespace) -> int:
    from extsvc.observability import tail as tail_module

    try:
        target = tail_module.Target.of(args.admin, args.token_file, not args.this_worker)
    except OSError as exc:
        print(f"extsvc {args.command}: cannot read the admin token: {exc}", file=sys.stderr)
        return 1
    query = tail_module.Query(
        services=args.service, policies=args.policy, outcomes=args.outcome,
        authority=args.authority, path_prefix=args.path_prefix,
        recent=max(args.last, 0) if args.command == "tail" else 0,
        follow=args.follow if args.command == "tail" else True,
    )
    try:
        if args.command == "tail":
            coroutine = tail_module.tail(
                target, query, sys.stdout, as_json=args.json,
                colour=tail_module.use_colour(args.color),
            )
        else:
            coroutine = tail_module.top(
                target, query, sys.stdout, window_s=args.window, interval_s=args.interval,
                iterations=args.iterations, clear=sys.stdout.isatty(),
            )
        asyncio.run(coroutine)
    except tail_module.TailError as exc:
        print(f"extsvc {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:  # `extsvc tail | head`
        return 0
    return 0


def _settings(args: argparse.Namespace) -> Settings:
    fields = set(Settings.model_fields)
    overrides = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    return Settings.load(overrides)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args, list(sys.argv[2:] if argv is None else argv[1:]))
        if args.command == "validate":
            return asyncio.run(_validate(args.file, args.verbose))
        if args.command == "plugins":
            return _plugins_list(args.json)
        if args.command == "demo":
            from extsvc import demo as demo_module

            return demo_module.run(args)
        if args.command in ("tail", "top"):
            return _stream(args)
        if args.command == "default-config":
            from extsvc.reload.provider import embedded_default_config

            sys.stdout.write(embedded_default_config())
            return 0
    except (ValidationError, ValueError) as exc:
        print(f"extsvc: invalid settings: {exc}", file=sys.stderr)
        return 2
    except PluginError as exc:
        print(f"extsvc: {exc}", file=sys.stderr)
        return 2
    return 2


def _serve(args: argparse.Namespace, raw_args: list[str]) -> int:
    from extsvc.observability import logging as extsvc_logging

    settings = _settings(args)
    extsvc_logging.configure(settings.log_level, settings.log_format, settings.redact_headers)
    if settings.workers > 1 and not args.reuse_port:
        from extsvc.supervisor import supervise

        passthrough = _without_workers(raw_args)
        return supervise(passthrough, settings.workers)

    from extsvc import eventloop
    from extsvc.app import ExtsvcServer

    try:
        server = ExtsvcServer(settings, reuse_port=args.reuse_port)
        eventloop.run(
            server.run(), settings.event_loop,
            cleanup_timeout_s=EXIT_CLEANUP_S, on_abandoned=_exit_abandoning,
        )
    except (PluginError, OSError, ValueError) as exc:
        log.error("cannot start: %s", exc)
        return 2
    return 0


#: seconds the tasks and threads left after the server stopped get before the process exits
EXIT_CLEANUP_S = 0.5


def _exit_abandoning(left: list[str], failed: bool) -> None:
    """Exit now, without waiting for ``left`` (they ignored their cancellation)."""
    log.error("exiting with %d task(s) or thread(s) still running: %s", len(left), "; ".join(left))
    logging.shutdown()  # flush the log handlers: os._exit skips the interpreter's clean-up
    os._exit(2 if failed else 0)


def _without_workers(raw: list[str]) -> list[str]:
    out: list[str] = []
    skip = False
    for item in raw:
        if skip:
            skip = False
            continue
        if item == "--workers":
            skip = True
            continue
        if item.startswith("--workers="):
            continue
        out.append(item)
    return out


async def _validate(path: Path, verbose: bool = False) -> int:
    from extsvc.plugin.host import PluginHost
    from extsvc.reload.compile import validate_file
    from extsvc.reload.provider import summarize_names

    settings = Settings.load()
    host = PluginHost.create(allow=settings.plugins_allow, block=settings.plugins_block)
    try:
        runtime = await validate_file(path, host, max_bytes=settings.max_config_bytes)
    except ConfigError as exc:
        print(f"{path}: {len(exc.problems)} problem(s)", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    await runtime.close()
    config = runtime.config

    def names(what: str, items: Iterable[str]) -> str:
        items = list(items)
        return f"{len(items)} {what}: {', '.join(sorted(items))}" if verbose else summarize_names(
            what, items
        )

    print(f"{path}: OK")
    print(f"  ext_authz: {names('policies', runtime.policies)}; "
          f"default: {config.default_policy or 'none'}")
    extproc = config.extproc
    print(f"  ext_proc: {names('policies', extproc.policies)}; "
          f"default: {extproc.default_policy or 'none'}")
    section = config.ratelimit
    if section is not None:
        from extsvc.ratelimit.config import load_domains

        domains, _ = load_domains(section, path.parent)
        print(f"  ratelimit: {names('domains', domains.domains)}; store: {section.store.type.value}")
    for note in config.notes():
        print(f"  note: {note}")
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("extsvc")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def _plugins_list(as_json: bool) -> int:
    from extsvc.plugin.host import PluginHost

    settings = Settings.load()
    host = PluginHost.create(allow=settings.plugins_allow, block=settings.plugins_block)
    rows: list[dict[str, Any]] = [p.describe() for p in host.plugins]
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        kinds = ", ".join(row["kinds"]) or "-"
        print(f"{row['name']:<16} {row['source']:<36} kinds: {kinds}")
        print(f"{'':<16} {row['location']}")
    return 0
