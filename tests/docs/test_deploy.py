"""docs/deploy.md: each way in, rendered or validated. The chart values go through Helm's Go SDK
and `extsvc validate`; the kgateway manifests through the translator and the CRDs' schemas; the
plain Envoy's bootstrap through `envoy --mode validate`; the Istio, Envoy Gateway and Argo CD
manifests against the field names those projects publish."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from extsvc.testing.harness import envoy_binary
from extsvc_controller.sources.files import load
from extsvc_controller.translate import translate

from .test_docs import ROOT, blocks

pytest.importorskip("helm_python", reason="helm-python-sdk ships Linux x86_64 wheels only")

from helm import chartkit
from helm.test_crds import crd_schema, structural_errors

DOC = ROOT / "docs" / "deploy.md"


def example(name: str) -> list[dict[str, Any]]:
    marker = f"# deploy-example: {name}\n"
    [body] = [body for path, body in blocks("yaml", marker) if path == "docs/deploy.md"]
    return [doc for doc in yaml.safe_load_all(body) if doc]


def test_the_values_render_and_give_the_server_a_valid_policy_file(tmp_path: Path) -> None:
    [values] = example("values")
    objects = chartkit.render(values, "edge", "shop")
    result = chartkit.validate_policy_file(objects, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ext_authz: 2 policies: members, open" in result.stdout
    assert "ratelimit: 1 domains: shop; store: redis" in result.stdout
    kinds = sorted(o["kind"] for o in objects)
    assert kinds.count("ServiceMonitor") == 1 and "Secret" not in kinds  # the password: their Secret


def test_kgateway_manifests_translate_against_the_charts_service(tmp_path: Path) -> None:
    docs = example("kgateway")
    for doc in docs:
        if doc["kind"] in ("GatewayExtension", "TrafficPolicy"):
            assert structural_errors(crd_schema(doc["kind"]), doc) == [], doc["metadata"]
    service = next(o for o in chartkit.render({}, "edge", "shop")
                   if o["kind"] == "Service" and o["metadata"]["name"] == "edge-extsvc")
    scene = [
        {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
         "metadata": {"name": "shop-gateway", "namespace": "shop"},
         "spec": {"gatewayClassName": "kgateway",
                  "listeners": [{"name": "http", "port": 80, "protocol": "HTTP"}]}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "shop-backend", "namespace": "shop"},
         "spec": {"ports": [{"name": "http", "port": 8080}]}},
        {**service, "metadata": {**service["metadata"], "namespace": "shop"}},
    ]
    path = tmp_path / "all.yaml"
    path.write_text(yaml.safe_dump_all(docs + scene))
    result = translate(load([path]))
    statuses = {(s.kind, s.name): s for s in result.statuses}
    policy = statuses[("TrafficPolicy", "members-only")]
    accepted = [c for a in policy.ancestors for c in a.conditions if c.type == "Accepted"]
    assert accepted and all(c.status == "True" for c in accepted), accepted
    assert not policy.warnings  # failOpen: false, and the Service speaks gRPC (appProtocol)
    assert dict(result.gateways)[("shop", "shop-gateway")]  # the Gateway got its listener


def test_the_controller_values_and_a_plain_envoy_bootstrap(tmp_path: Path) -> None:
    [values] = example("controller-values")
    objects = chartkit.render(values, "edge", "shop")
    services = [o["metadata"]["name"] for o in objects if o["kind"] == "Service"]
    assert services == ["edge-extsvc", "edge-extsvc-xds"]
    assert len(chartkit.of_kind(objects, "CustomResourceDefinition")) == 2
    lines = DOC.read_text().splitlines()
    command = [line for line in lines if line.startswith("extsvc-controller render --xds")]
    assert command, "the bootstrap command"
    argv = command[0].split()[1:]
    output = tmp_path / "envoy.yaml"
    argv[argv.index("-o") + 1] = str(output)
    result = subprocess.run([sys.executable, "-m", "extsvc_controller", *argv],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    check = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(output)],
                           capture_output=True, text=True, check=False, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr


#: field names from Istio's published API (MeshConfig.ExtensionProvider's
#: EnvoyExternalAuthorizationGrpcProvider, security.istio.io/v1 AuthorizationPolicy)
ISTIO_GRPC_PROVIDER = {"service", "port", "timeout", "failOpen", "clearRouteCache", "statusOnError",
                       "includeRequestBodyInCheck"}
ISTIO_POLICY_SPEC = {"selector", "targetRef", "targetRefs", "rules", "action", "provider"}


def test_istio_provider_and_policy_use_istios_fields() -> None:
    [mesh] = example("istio-meshconfig")
    [provider] = mesh["meshConfig"]["extensionProviders"]
    assert set(provider) == {"name", "envoyExtAuthzGrpc"}
    assert set(provider["envoyExtAuthzGrpc"]) <= ISTIO_GRPC_PROVIDER
    assert provider["envoyExtAuthzGrpc"]["port"] == 9001
    assert provider["envoyExtAuthzGrpc"]["service"].startswith("edge-extsvc.shop.svc")
    [policy] = example("istio-authorizationpolicy")
    assert policy["apiVersion"] == "security.istio.io/v1" and policy["kind"] == "AuthorizationPolicy"
    assert set(policy["spec"]) <= ISTIO_POLICY_SPEC
    assert policy["spec"]["action"] == "CUSTOM" and policy["spec"]["provider"]["name"] == provider["name"]


def test_envoy_gateway_policies_use_its_fields() -> None:
    security, extension = example("envoy-gateway")
    assert (security["apiVersion"], security["kind"]) == ("gateway.envoyproxy.io/v1alpha1", "SecurityPolicy")
    assert set(security["spec"]) <= {"targetRefs", "targetSelectors", "extAuth"}
    assert set(security["spec"]["extAuth"]) <= {"grpc", "http", "failOpen", "headersToExtAuth",
                                                 "bodyToExtAuth", "recomputeRoute", "timeout"}
    assert security["spec"]["extAuth"]["grpc"]["backendRefs"] == [{"name": "edge-extsvc", "port": 9001}]
    assert extension["apiVersion"] == "gateway.envoyproxy.io/v1alpha1"
    assert extension["kind"] == "EnvoyExtensionPolicy"
    [proc] = extension["spec"]["extProc"]
    assert set(proc) <= {"backendRefs", "backendSettings", "processingMode", "messageTimeout", "failOpen",
                         "metadata"}
    assert proc["processingMode"]["response"]["body"] in ("Streamed", "Buffered", "BufferedPartial")


def test_argocd_application_points_at_the_chart_and_its_values_render() -> None:
    [app] = example("argocd-application")
    source = app["spec"]["source"]
    assert (ROOT / source["path"] / "Chart.yaml").is_file()
    objects = chartkit.render(source["helm"]["valuesObject"], source["helm"]["releaseName"], "shop")
    assert [o["kind"] for o in objects if o["kind"] == "Deployment"] == ["Deployment"]
    [health] = example("argocd-health")
    [(key, script)] = health["data"].items()
    assert key == "resource.customizations.health.gateway.kgateway.dev_TrafficPolicy"
    assert "obj.status.ancestors" in script and 'condition.type == "Accepted"' in script
    assert script.rstrip().endswith("return hs")
