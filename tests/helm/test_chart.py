"""helm/extsvc rendered with Helm's own Go SDK (helm-python-sdk) over a matrix of values: what
comes out, the RBAC it asks for, the policy file it gives the server, and what its schema refuses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from . import chartkit
from .chartkit import CHART, of_kind

helm = pytest.importorskip("helm_python", reason="helm-python-sdk ships Linux x86_64 wheels only")

RELEASE, NAMESPACE = "edge", "gateway"

DOMAIN = {"domain": "api",
          "descriptors": [{"key": "user", "rate_limit": {"unit": "minute", "requests_per_unit": 60}}]}
POLICIES = {
    "version": 1,
    "default_policy": "members",
    "policies": {
        "members": {"steps": [{"plugin": "deny", "config": {"status": 401, "body": "members only\n"}}]},
        "open": {"steps": [{"plugin": "allow"}]},
    },
    "ratelimit": {"store": {"timeout_ms": 50}},
}

#: values case -> (values, the kinds it renders, in order)
CASES: dict[str, tuple[dict[str, Any], list[str]]] = {
    "default": ({}, ["ConfigMap", "Deployment", "PodDisruptionBudget", "Service"]),
    "controller": (
        {"controller": {"enabled": True, "gatewayClasses": ["extsvc"], "namespaces": ["shop"]}},
        ["ClusterRole", "ClusterRoleBinding", "ConfigMap", "Deployment", "Deployment",
         "PodDisruptionBudget", "Role", "RoleBinding", "Service", "Service", "ServiceAccount"],
    ),
    "redis-password": (
        {"redis": {"enabled": True, "password": "s3cr3t-pw"},
         "config": {"file": POLICIES, "ratelimitDomains": {"api.yaml": DOMAIN}}},
        ["ConfigMap", "ConfigMap", "Deployment", "PodDisruptionBudget", "Secret", "Service"],
    ),
    "redis-cluster-existing-secret": (
        {"redis": {"enabled": True, "type": "redis-cluster", "urls": ["redis://r0:6379", "redis://r1:6379"],
                   "existingSecret": "redis-auth", "existingSecretKey": "pw"},
         "config": {"ratelimitDomains": {"api.yaml": DOMAIN}}},
        ["ConfigMap", "ConfigMap", "Deployment", "PodDisruptionBudget", "Service"],
    ),
    "crds": ({"crds": {"install": True}},
             ["ConfigMap", "CustomResourceDefinition", "CustomResourceDefinition", "Deployment",
              "PodDisruptionBudget", "Service"]),
    "mtls-autoscaling-monitoring": (
        {"server": {"tls": {"enabled": True, "secretName": "extsvc-tls", "clientCASecretName": "envoy-ca"},
                    "autoscaling": {"enabled": True}, "podDisruptionBudget": {"enabled": False},
                    "workers": 2},
         "metrics": {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}}},
        ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "PrometheusRule", "Service", "ServiceMonitor"],
    ),
    "grafana-dashboard": ({"grafanaDashboard": {"enabled": True}},
                          ["ConfigMap", "ConfigMap", "Deployment", "PodDisruptionBudget", "Service"]),
}


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    return chartkit.render(values, RELEASE, NAMESPACE)


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    name = request.param
    return name, render(CASES[name][0])


def test_each_case_renders_the_objects_it_asks_for(case: tuple[str, list[dict[str, Any]]]) -> None:
    name, objects = case
    assert [o["kind"] for o in objects] == CASES[name][1]


def test_every_object_carries_the_recommended_labels(case: tuple[str, list[dict[str, Any]]]) -> None:
    _, objects = case
    for o in objects:
        labels = o["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "extsvc"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["app.kubernetes.io/component"] in ("server", "controller", "crds")
        assert labels["app.kubernetes.io/version"] == labels["helm.sh/chart"].removeprefix("extsvc-")
    for deployment in of_kind(objects, "Deployment"):
        selector = deployment["spec"]["selector"]["matchLabels"]
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= pod_labels.items()
        assert "app.kubernetes.io/version" not in selector  # a selector never changes on upgrade


def test_pods_run_unprivileged_with_probes(case: tuple[str, list[dict[str, Any]]]) -> None:
    _, objects = case
    for deployment in of_kind(objects, "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        [container] = pod["containers"]
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"] == {"drop": ["ALL"]}
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
        assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]  # the only writable place
        assert container["resources"]["limits"]["memory"]


def test_the_grpc_service_asks_for_http2_and_drains_on_the_way_out(
    case: tuple[str, list[dict[str, Any]]],
) -> None:
    _, objects = case
    service = next(s for s in of_kind(objects, "Service") if s["metadata"]["name"] == f"{RELEASE}-extsvc")
    grpc = next(p for p in service["spec"]["ports"] if p["name"] == "grpc")
    assert (grpc["port"], grpc["appProtocol"]) == (9001, "grpc")
    server = next(d for d in of_kind(objects, "Deployment") if d["metadata"]["name"] == f"{RELEASE}-extsvc")
    pod = server["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    drain, grace = float(env["EXTSVC_DRAIN_DELAY_S"]), float(env["EXTSVC_GRACE_PERIOD_S"])
    pre_stop = pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[:2] == ["python3", "-c"]
    assert pod["terminationGracePeriodSeconds"] > 3 + drain + grace  # preStop, drain, in-flight RPCs
    assert env["EXTSVC_ADMIN_ADDRESS"] == "0.0.0.0:9002"  # the kubelet probes the pod's address


def test_crds_come_only_when_asked_and_are_kept_on_uninstall() -> None:
    assert of_kind(render({}), "CustomResourceDefinition") == []
    kept = of_kind(render({"crds": {"install": True}}), "CustomResourceDefinition")
    assert [c["metadata"]["annotations"] for c in kept] == [{"helm.sh/resource-policy": "keep"}] * 2
    dropped = of_kind(render({"crds": {"install": True, "keep": False}}), "CustomResourceDefinition")
    assert [c["metadata"].get("annotations") for c in dropped] == [None, None]


def test_no_secret_is_ever_in_a_configmap(case: tuple[str, list[dict[str, Any]]]) -> None:
    _, objects = case
    for cm in of_kind(objects, "ConfigMap"):
        assert "s3cr3t-pw" not in yaml.safe_dump(cm)


def test_the_controller_asks_for_nothing_broader_than_it_uses() -> None:
    objects = render(CASES["controller"][0])
    [cluster_role] = of_kind(objects, "ClusterRole")
    [role] = of_kind(objects, "Role")
    rules = [
        (tuple(r["apiGroups"]), tuple(r["resources"]), tuple(r["verbs"]), tuple(r.get("resourceNames", ())))
        for r in cluster_role["rules"] + role["rules"]
    ]
    assert rules == [
        (("gateway.networking.k8s.io",), ("gateways", "httproutes", "grpcroutes", "referencegrants"),
         ("get", "list", "watch"), ()),
        (("gateway.networking.k8s.io",), ("gateways/status", "httproutes/status", "grpcroutes/status"),
         ("patch",), ()),
        (("gateway.kgateway.dev",), ("gatewayextensions", "trafficpolicies"), ("get", "list", "watch"), ()),
        (("gateway.kgateway.dev",), ("gatewayextensions/status", "trafficpolicies/status"), ("patch",), ()),
        (("",), ("services", "secrets"), ("get", "list", "watch"), ()),
        (("discovery.k8s.io",), ("endpointslices",), ("get", "list", "watch"), ()),
        (("coordination.k8s.io",), ("leases",), ("create",), ()),
        (("coordination.k8s.io",), ("leases",), ("get", "update"), (f"{RELEASE}-extsvc-controller",)),
    ]
    assert not any("*" in part for rule in rules for group in rule for part in group)
    assert role["metadata"].get("namespace", NAMESPACE) == NAMESPACE  # the Lease: this namespace only
    controller = next(
        d for d in of_kind(objects, "Deployment") if d["metadata"]["name"].endswith("-controller")
    )
    args = controller["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[:3] == ["extsvc-controller", "run", "--kubernetes"]
    assert "--gateway-class=extsvc" in args and "--namespace=shop" in args
    assert f"--lease-name={RELEASE}-extsvc-controller" in args
    assert controller["spec"]["replicas"] == 2


def test_the_rendered_policy_file_passes_extsvc_validate(tmp_path: Path) -> None:
    """What the pod reads, checked as a reload would check it: the ConfigMap's file, with the
    mounted domain files and password where the pod has them."""
    objects = render(CASES["redis-password"][0])
    maps = {cm["metadata"]["name"]: cm["data"] for cm in of_kind(objects, "ConfigMap")}
    policy = yaml.safe_load(maps[f"{RELEASE}-extsvc-config"]["extsvc.yaml"])
    store = policy["ratelimit"]["store"]
    assert (store["type"], store["url"], store["password_file"], store["timeout_ms"]) == (
        "redis", "redis://redis:6379/0", "/etc/extsvc/redis/password", 50
    )
    assert policy["ratelimit"]["config_dir"] == "/etc/extsvc/ratelimit"
    result = chartkit.validate_policy_file(objects, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout and "ext_authz: 2 policies: members, open" in result.stdout
    secret = of_kind(objects, "Secret")[0]
    assert secret["type"] == "Opaque" and set(secret["data"]) == {"password"}


def test_a_config_change_rolls_the_pods_unless_told_otherwise() -> None:
    def checksum(values: dict[str, Any]) -> str | None:
        server = of_kind(render(values), "Deployment")[0]
        return server["spec"]["template"]["metadata"].get("annotations", {}).get("checksum/config")

    other = {"config": {"file": {**POLICIES, "ratelimit": None}}}
    other["config"]["file"].pop("ratelimit")
    assert checksum({}) and checksum(other) and checksum({}) != checksum(other)
    assert checksum({"config": {"rollOnChange": False}}) is None


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"server": {"workers": 0}}, "at '/server/workers': minimum: got 0, want 1"),
        ({"server": {"grpcPorts": 1}}, "additional properties 'grpcPorts' not allowed"),
        ({"redis": {"url": "http://cache:6379"}}, "at '/redis/url'"),
        ({"server": {"extraEnv": {"PATH": "/x"}}}, "'PATH' does not match pattern '^EXTSVC_[A-Z0-9_]+$'"),
        ({"server": {"logLevel": "verbose"}}, "at '/server/logLevel'"),
        ({"controller": {"controllerName": "no slash"}}, "at '/controller/controllerName'"),
        ({"config": {"ratelimitDomains": {"api.json": {}}}}, "'api.json' does not match pattern"),
        ({"grafanaDashboard": {"namespace": "Grafana"}}, "at '/grafanaDashboard/namespace'"),
    ],
)
def test_the_schema_refuses_bad_values_naming_the_key(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmValuesError) as refused:
        helm.Chart.load(CHART).render(values, name=RELEASE, namespace=NAMESPACE)
    assert message in str(refused.value)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"redis": {"enabled": True}}, "redis.enabled: the rate-limit service needs domain files"),
        ({"redis": {"enabled": True, "type": "redis-cluster"},
          "config": {"ratelimitDomains": {"a.yaml": DOMAIN}}},
         "redis.urls: redis-cluster needs at least one seed node"),
        ({"server": {"tls": {"enabled": True}}}, "server.tls.secretName"),
    ],
)
def test_values_that_cannot_work_together_are_refused_with_what_to_set(
    values: dict[str, Any], message: str
) -> None:
    with pytest.raises(helm.HelmError) as refused:
        render(values)
    assert message in str(refused.value)


def test_the_chart_lints_clean_and_its_notes_say_where_to_connect() -> None:
    report = helm.lint(CHART, strict=True)
    assert report["errors"] == [] and [m for m in report["messages"] if m["severity"] >= 2] == []
    chart = helm.Chart.load(CHART)
    rendered = chart.render({"controller": {"enabled": True}}, name=RELEASE, namespace=NAMESPACE)
    text = rendered["extsvc/templates/NOTES.txt"]
    assert f"{RELEASE}-extsvc.{NAMESPACE}.svc:9001" in text
    assert f"{RELEASE}-extsvc-xds.{NAMESPACE}.svc:18000" in text
    assert "every Check is denied (403)" in text  # the default values have no policy
    configured = chart.render({"config": {"file": POLICIES}}, name=RELEASE, namespace=NAMESPACE)
    assert "every Check is denied" not in configured["extsvc/templates/NOTES.txt"]
    # how to watch the decisions, and a word about the token
    assert f"exec deploy/{RELEASE}-extsvc -- extsvc tail -f\n" in text
    assert "has no token: set server.adminTokenSecret" in text
    guarded = chart.render({"server": {"adminTokenSecret": {"name": "t"}}}, name=RELEASE,
                           namespace=NAMESPACE)["extsvc/templates/NOTES.txt"]
    assert "extsvc tail -f --token-file /etc/extsvc/admin/token" in guarded
    assert "has no token" not in guarded


def test_every_value_is_described_in_values_yaml() -> None:
    """Each key of values.yaml has a comment just above it, except the keys of a section (its
    own keys carry the descriptions) and those inside a default written out in full (the policy
    file, resources)."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    stack: list[tuple[int, str]] = []
    for number, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        indent = len(line) - len(line.lstrip())
        while stack and stack[-1][0] >= indent:
            stack.pop()
        parents = [key for _, key in stack]
        key = stripped.split(":", 1)[0]
        stack.append((indent, key))
        if stripped.endswith(":") or {"file", "resources"} & set(parents):
            continue
        assert lines[number - 1].strip().startswith("#"), f"values.yaml line {number + 1}: {line.strip()!r}"


def test_the_alerts_name_only_metrics_extsvc_exports() -> None:
    import re

    from extsvc.observability.metrics import Metrics

    [rule] = of_kind(render({"metrics": {"prometheusRule": {"enabled": True}}}), "PrometheusRule")
    used = set(re.findall(r"\bextsvc_[a-z_]+", yaml.safe_dump(rule["spec"])))
    exported: set[str] = set()
    for family in Metrics().registry.collect():
        exported |= {family.name, f"{family.name}_total"} if family.type == "counter" else {family.name}
    assert used and used <= exported, used - exported


def test_the_grafana_dashboard_ships_in_a_configmap_for_the_sidecar() -> None:
    """The ConfigMap carries dashboards/extsvc.json as it is in the chart (the file that
    tests/docs/test_dashboard.py checks against a live extsvc), with the sidecar's label."""
    import json

    def dashboards(values: dict[str, Any]) -> list[dict[str, Any]]:
        return [cm for cm in of_kind(render(values), "ConfigMap")
                if cm["metadata"]["name"] == f"{RELEASE}-extsvc-dashboard"]

    assert dashboards({}) == []
    [cm] = dashboards({"grafanaDashboard": {"enabled": True}})
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert "namespace" not in cm["metadata"]  # the release's
    [(name, text)] = cm["data"].items()
    assert name == "extsvc.json"
    assert json.loads(text) == json.loads((CHART / "dashboards" / "extsvc.json").read_text())

    [elsewhere] = dashboards({"grafanaDashboard": {
        "enabled": True, "namespace": "monitoring", "labels": {"grafana_dashboard": None, "team": "edge"},
    }})
    assert elsewhere["metadata"]["namespace"] == "monitoring"
    labels = elsewhere["metadata"]["labels"]
    assert labels["team"] == "edge" and "grafana_dashboard" not in labels


def test_an_admin_token_secret_guards_the_decision_stream() -> None:
    """server.adminTokenSecret: the Secret's key is mounted as a file and named in
    EXTSVC_ADMIN_TOKEN_FILE (the decision stream then requires it); nothing without it."""
    def server(values: dict[str, Any]) -> dict[str, Any]:
        pod = of_kind(render(values), "Deployment")[0]["spec"]["template"]["spec"]
        container = pod["containers"][0]
        env = {e["name"]: e.get("value") for e in container["env"]}
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        return {"env": env, "mounts": mounts, "volumes": volumes}

    plain = server({})
    assert "EXTSVC_ADMIN_TOKEN_FILE" not in plain["env"] and "admin-token" not in plain["volumes"]
    guarded = server({"server": {"adminTokenSecret": {"name": "tail-token", "key": "t"}}})
    assert guarded["env"]["EXTSVC_ADMIN_TOKEN_FILE"] == "/etc/extsvc/admin/token"
    assert guarded["mounts"]["admin-token"] == "/etc/extsvc/admin"
    assert guarded["volumes"]["admin-token"]["secret"] == {
        "secretName": "tail-token", "items": [{"key": "t", "path": "token"}]
    }
