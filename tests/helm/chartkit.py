"""The chart rendered with Helm's own Go SDK, for the chart's tests and the deploy docs' tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

CHART = Path(__file__).resolve().parents[2] / "helm" / "extsvc"


def render(values: dict[str, Any], release: str = "edge", namespace: str = "gateway") -> list[dict[str, Any]]:
    """Every object the chart renders with ``values``, sorted by kind and name."""
    import helm_python as helm

    out = helm.Chart.load(CHART).render(values, name=release, namespace=namespace)
    docs = [
        doc for path, text in sorted(out.items()) if not path.endswith(".txt")
        for doc in yaml.safe_load_all(text) if doc
    ]
    return sorted(docs, key=lambda d: (d["kind"], d["metadata"]["name"]))


def of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def validate_policy_file(objects: list[dict[str, Any]], tmp: Path) -> subprocess.CompletedProcess[str]:
    """``extsvc validate`` of the policy file the server pod reads, with the mounted domain files
    and Redis password placed where the pod has them (here: under ``tmp``)."""
    maps = {cm["metadata"]["name"]: cm["data"] for cm in of_kind(objects, "ConfigMap")}
    [config] = [data for name, data in maps.items() if name.endswith("-config")]
    policy = yaml.safe_load(config["extsvc.yaml"])
    ratelimit = policy.get("ratelimit") or {}
    if ratelimit.get("config_dir") == "/etc/extsvc/ratelimit":
        domains = tmp / "ratelimit"
        domains.mkdir()
        [files] = [data for name, data in maps.items() if name.endswith("-ratelimit")]
        for name, text in files.items():
            (domains / name).write_text(text)
        ratelimit["config_dir"] = str(domains)
    store = ratelimit.get("store") or {}
    if store.get("password_file"):
        (tmp / "password").write_text("a-password")
        store["password_file"] = str(tmp / "password")
    path = tmp / "extsvc.yaml"
    path.write_text(yaml.safe_dump(policy))
    return subprocess.run([sys.executable, "-m", "extsvc", "validate", str(path)],
                          capture_output=True, text=True, check=False)
