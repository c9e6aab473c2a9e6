"""Translate 1,000 HTTPRoutes + 1,000 TrafficPolicies (issue 6 target: < 2 s) and render them.

    .venv/bin/python bench/controller_bench.py [--routes 1000] [--repeat 3]

Each route has two rules; each policy targets one route (extAuth with contextExtensions, extProc,
and a global rate limit), every tenth one a rule with a local limit. Prints the translate time,
the YAML render time, and the baseline: parsing the same manifests (each the best of
``--repeat`` runs, so that a busy machine disturbs the figures less).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from extsvc_controller import render
from extsvc_controller.sources.files import snapshot_from_documents
from extsvc_controller.translate import translate


def documents(n: int) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = [
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "Gateway",
            "metadata": {"name": "gw", "namespace": "demo"},
            "spec": {"listeners": [{"name": "http", "port": 80, "protocol": "HTTP"}]},
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "extsvc", "namespace": "demo"},
            "spec": {"ports": [{"port": 9001, "appProtocol": "grpc"}]},
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "backend", "namespace": "demo"},
            "spec": {"ports": [{"port": 8080}]},
        },
    ]
    for kind, block in (
        ("authz", {"extAuth": {"grpcService": {"backendRef": {"name": "extsvc", "port": 9001}}}}),
        ("proc", {"extProc": {"grpcService": {"backendRef": {"name": "extsvc", "port": 9001}}}}),
        (
            "rls",
            {"rateLimit": {"domain": "d", "grpcService": {"backendRef": {"name": "extsvc", "port": 9001}}}},
        ),
    ):
        docs.append(
            {
                "apiVersion": "gateway.kgateway.dev/v1alpha1",
                "kind": "GatewayExtension",
                "metadata": {"name": kind, "namespace": "demo"},
                "spec": block,
            }
        )
    for i in range(n):
        docs.append(
            {
                "apiVersion": "gateway.networking.k8s.io/v1",
                "kind": "HTTPRoute",
                "metadata": {"name": f"r{i}", "namespace": "demo"},
                "spec": {
                    "parentRefs": [{"name": "gw"}],
                    "hostnames": [f"h{i % 50}.example.com"],
                    "rules": [
                        {
                            "name": "a",
                            "matches": [{"path": {"type": "PathPrefix", "value": f"/r{i}/a"}}],
                            "backendRefs": [{"name": "backend", "port": 8080}],
                        },
                        {
                            "name": "b",
                            "matches": [{"path": {"type": "Exact", "value": f"/r{i}/b"}}],
                            "backendRefs": [{"name": "backend", "port": 8080}],
                        },
                    ],
                },
            }
        )
        spec: dict[str, Any] = {
            "targetRefs": [
                {
                    "group": "gateway.networking.k8s.io",
                    "kind": "HTTPRoute",
                    "name": f"r{i}",
                    **({"sectionName": "a"} if i % 10 == 0 else {}),
                }
            ],
            "extAuth": {"extensionRef": {"name": "authz"}, "contextExtensions": {"tenant": f"t{i}"}},
            "extProc": {"extensionRef": {"name": "proc"}},
            "rateLimit": {
                "global": {
                    "extensionRef": {"name": "rls"},
                    "descriptors": [
                        {
                            "entries": [
                                {"type": "Generic", "generic": {"key": "route", "value": f"r{i}"}},
                                {"type": "RemoteAddress"},
                            ]
                        }
                    ],
                }
            },
        }
        if i % 10 == 0:
            spec["rateLimit"]["local"] = {"tokenBucket": {"maxTokens": 10, "fillInterval": "1s"}}
        docs.append(
            {
                "apiVersion": "gateway.kgateway.dev/v1alpha1",
                "kind": "TrafficPolicy",
                "metadata": {"name": f"p{i}", "namespace": "demo"},
                "spec": spec,
            }
        )
    return docs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--routes", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    docs = documents(args.routes)
    translate(snapshot_from_documents(documents(5)))  # warm caches (imports, validators)
    parse = trans = rend = float("inf")
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        snapshot = snapshot_from_documents(docs)
        t1 = time.perf_counter()
        result = translate(snapshot)
        t2 = time.perf_counter()
        text = render.bootstrap_yaml(result)
        t3 = time.perf_counter()
        assert result.ok
        parse, trans, rend = min(parse, t1 - t0), min(trans, t2 - t1), min(rend, t3 - t2)
    print(f"{args.routes} HTTPRoutes + {args.routes} TrafficPolicies (best of {args.repeat})")
    print(f"  parse manifests (baseline): {parse:6.3f} s")
    print(f"  translate:                  {trans:6.3f} s   (target < 2 s; {trans / parse:.1f}x parse)")
    print(f"  render YAML:                {rend:6.3f} s   ({len(text) / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
