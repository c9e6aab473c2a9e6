"""CustomResourceDefinitions for GatewayExtension and TrafficPolicy, from the models the
translator reads (:mod:`.model`): kgateway's group and version (``gateway.kgateway.dev/v1alpha1``),
its field names, and the schema-level validation of the fields extsvc translates (types, enums,
patterns, ranges, required fields). The rest of kgateway's spec is kept as written
(``x-kubernetes-preserve-unknown-fields``), so a kgateway manifest is accepted unchanged and the
controller reports what it does not translate on the object's status. kgateway's CEL rules
(``x-kubernetes-validations``) are not part of these CRDs: the controller checks them
(:mod:`.crd`) and reports failures on the status.

``extsvc-controller crds`` prints them; the Helm chart ships them (``crds.install``).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from . import model
from .model import KGATEWAY

__all__ = ["definitions", "openapi"]

VERSION = "v1alpha1"
#: (kind, plural, spec model, short names)
_KINDS: tuple[tuple[str, str, type[BaseModel], list[str]], ...] = (
    ("GatewayExtension", "gatewayextensions", model.GatewayExtensionSpec, ["gwe"]),
    ("TrafficPolicy", "trafficpolicies", model.TrafficPolicySpec, ["tp"]),
)
#: JSON schema keywords a structural OpenAPI v3 schema keeps as they are
_KEPT = ("type", "description", "enum", "pattern", "minimum", "maximum", "minLength", "maxLength",
         "minItems", "maxItems", "format")


def openapi(spec_model: type[BaseModel]) -> dict[str, Any]:
    """The structural OpenAPI v3 schema of a model's JSON schema (pydantic's, camelCase names):
    references inlined, ``X | None`` as X, ``const`` as an enum, exclusive bounds as OpenAPI 3.0
    writes them, no titles or defaults (the API server would apply defaults to stored objects)."""
    schema = spec_model.model_json_schema(by_alias=True, mode="validation")
    return _convert(schema, schema.get("$defs", {}))


def _convert(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in node:
        return _convert(defs[node["$ref"].rsplit("/", 1)[1]], defs)
    if "anyOf" in node:
        branches = [b for b in node["anyOf"] if b.get("type") != "null"]
        if len(branches) == 1:
            out = _convert(branches[0], defs)
            if node.get("description"):
                out["description"] = node["description"]
            return out
        types = {b.get("type") for b in branches}
        if types == {"integer", "string"}:
            return {"x-kubernetes-int-or-string": True}
        return {"x-kubernetes-preserve-unknown-fields": True}  # a union a structural schema cannot say
    out = {key: node[key] for key in _KEPT if key in node}
    if "const" in node:
        out["enum"] = [node["const"]]
        kinds = {str: "string", bool: "boolean", int: "integer"}
        out.setdefault("type", kinds.get(type(node["const"]), "string"))
    for bound, inclusive in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if bound in node:
            out[inclusive] = node[bound]
            out[bound] = True
    if node.get("type") == "object" or "properties" in node:
        out["type"] = "object"
        properties = node.get("properties", {})
        if properties:
            out["properties"] = {name: _convert(sub, defs) for name, sub in properties.items()}
            if node.get("required"):
                out["required"] = list(node["required"])
        elif isinstance(node.get("additionalProperties"), dict):  # a map
            out["additionalProperties"] = _convert(node["additionalProperties"], defs)
    if node.get("type") == "array" and "items" in node:
        out["items"] = _convert(node["items"], defs)
    return out


def definitions() -> list[dict[str, Any]]:
    """The two CustomResourceDefinitions, as documents."""
    out = []
    for kind, plural, spec_model, short in _KINDS:
        spec = openapi(spec_model)
        spec["x-kubernetes-preserve-unknown-fields"] = True  # kgateway's fields extsvc does not read
        spec["description"] = f"{kind} spec (the fields extsvc-controller translates are checked here)"
        out.append({
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": f"{plural}.{KGATEWAY}"},
            "spec": {
                "group": KGATEWAY,
                "names": {"kind": kind, "listKind": f"{kind}List", "plural": plural,
                          "singular": kind.lower(), "shortNames": short, "categories": ["kgateway"]},
                "scope": "Namespaced",
                "versions": [{
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "schema": {"openAPIV3Schema": {
                        "type": "object",
                        "required": ["spec"],
                        "properties": {
                            "apiVersion": {"type": "string"},
                            "kind": {"type": "string"},
                            "metadata": {"type": "object"},
                            "spec": spec,
                            "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                        },
                    }},
                }],
            },
        })
    return out
