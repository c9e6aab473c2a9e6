"""Manifests from files, directories and stdin (multi-document YAML, ``kind: List``) -> a :class:`Snapshot`.

Documents that are not Kubernetes objects, and objects of kinds the translator does not read, are
skipped with a warning: :func:`read` returns the warnings as data, the CLI prints them.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import yaml

from .. import model
from ..model import GATEWAY_API, KGATEWAY
from ..translate import Invalid, Snapshot

__all__ = [
    "STDIN",
    "ManifestError",
    "Manifests",
    "describe",
    "load",
    "parse_yaml",
    "read",
    "read_text",
    "snapshot_from_documents",
]

STDIN = Path("-")  # ``-f -``
_STDIN_NAME = "<stdin>"
# The kinds the translator reads, by API group (any version).
_GROUPS = {
    "Gateway": GATEWAY_API,
    "HTTPRoute": GATEWAY_API,
    "GRPCRoute": GATEWAY_API,
    "ReferenceGrant": GATEWAY_API,
    "Service": "",
    "Secret": "",
    "EndpointSlice": "discovery.k8s.io",
    "GatewayExtension": KGATEWAY,
    "TrafficPolicy": KGATEWAY,
}


class ManifestError(Exception):
    """A file that cannot be read or is not YAML."""


@dataclass(frozen=True, slots=True)
class Manifests:
    snapshot: Snapshot
    warnings: tuple[str, ...] = ()  # one line each: what was skipped, where, and why


def describe(exc: OSError) -> str:
    """An OSError's reason without the path or errno: ``permission denied``."""
    return (exc.strerror or str(exc)).lower()


def manifest_files(paths: Iterable[Path], warnings: list[str]) -> list[Path]:
    """The files ``paths`` name, directories searched for *.yaml / *.yml (sorted)."""
    out: list[Path] = []
    for path in paths:
        if path == STDIN:
            out.append(path)
        elif path.is_dir():
            try:
                found = sorted(p for p in path.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())
            except OSError as exc:
                raise ManifestError(f"{path}: {describe(exc)}") from exc
            if not found:
                warnings.append(f"{path}: no *.yaml or *.yml file in this directory")
            out += found
        elif path.exists():
            out.append(path)
        else:
            raise ManifestError(f"{path}: no such file or directory")
    return out


def read_text(path: Path, stdin: TextIO | None = None) -> str:
    """The UTF-8 text of ``path`` (:data:`STDIN`: of ``stdin``); ManifestError naming it if unreadable."""
    name = _STDIN_NAME if path == STDIN else str(path)
    stream = stdin or sys.stdin
    if path == STDIN and stream is None:
        raise ManifestError(f"{name}: no standard input")
    try:
        return stream.read() if path == STDIN else path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ManifestError(f"{name}: {describe(exc)}") from exc
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{name}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc


def parse_yaml(name: str, text: str) -> list[Any]:
    """The documents of a YAML text; ManifestError with one line (``name``, problem, line) if not YAML."""
    try:
        return list(yaml.safe_load_all(text))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise ManifestError(f"{name}: not valid YAML: {exc.problem or exc.context}{where}") from exc
    except yaml.YAMLError as exc:
        raise ManifestError(f"{name}: not valid YAML: {' '.join(str(exc).split())}") from exc


def _items(where: str, doc: Any) -> Iterator[tuple[str, Any]]:
    """The objects of one document: itself, or the items of a ``kind: List`` (or ``<Kind>List``)."""
    kind = doc.get("kind") if isinstance(doc, dict) else None
    if not (isinstance(kind, str) and kind.endswith("List") and "items" in doc):
        yield where, doc
        return
    items = doc.get("items") or []
    if not isinstance(items, list):
        yield where, items  # reported as not an object
        return
    for i, item in enumerate(items, 1):
        if kind != "List" and isinstance(item, dict):
            # A typed list (``GatewayList``) from the API leaves out its items' kind and apiVersion.
            item = {"kind": kind.removesuffix("List"), "apiVersion": doc.get("apiVersion"), **item}
        yield f"{where}, item {i}", item


_TYPES = {list: "a list", str: "a string", int: "a number", float: "a number", bool: "a boolean"}


def _skip_reason(doc: Any) -> str | None:
    """Why a document is not read (None: it is an object of a kind the translator reads)."""
    if not isinstance(doc, dict):
        return f"not a Kubernetes object ({_TYPES.get(type(doc), type(doc).__name__)})"
    missing = [k for k in ("apiVersion", "kind") if not isinstance(doc.get(k), str) or not doc[k]]
    if missing:
        return f"not a Kubernetes object (no {' or '.join(missing)})"
    kind, api_version = doc["kind"], doc["apiVersion"]
    group = api_version.rpartition("/")[0]
    if _GROUPS.get(kind) == group:
        return None
    meta = doc.get("metadata")
    meta = meta if isinstance(meta, dict) else {}
    name = str(meta.get("name") or "?")
    if meta.get("namespace"):
        name = f"{meta['namespace']}/{name}"
    return f"{kind} {name} ({api_version}): a kind extsvc-controller does not read"


def snapshot_from_documents(documents: Iterable[dict[str, Any]]) -> Snapshot:
    """Parse each document; invalid ones are kept (with their errors) for the status report."""
    objects: list[model.Object] = []
    invalid: list[Invalid] = []
    for raw in documents:
        obj, errors = model.parse_object(raw)
        if obj is not None:
            objects.append(obj)
            continue
        if not errors:
            continue  # a kind this controller does not read (read() has warned about it)
        meta = raw.get("metadata") if isinstance(raw.get("metadata"), dict) else {}
        assert isinstance(meta, dict)
        kind = str(raw.get("kind"))
        targeting = model.parse_targeting(raw) if kind == "TrafficPolicy" else None
        invalid.append(
            Invalid(
                kind,
                str(meta.get("namespace") or "default"),
                str(meta.get("name") or "?"),
                tuple(errors),
                targeting,
            )
        )
    return Snapshot(tuple(objects), tuple(invalid))


def read(paths: Iterable[Path], stdin: TextIO | None = None) -> Manifests:
    """Read every manifest under ``paths``: files, directories (searched for *.yaml / *.yml), and
    :data:`STDIN` (``-``, read once from ``stdin``, by default ``sys.stdin``).

    :raises ManifestError: a path that cannot be read, or a file that is not YAML.
    """
    warnings: list[str] = []
    docs: list[dict[str, Any]] = []
    seen: set[Path] = set()
    for path in manifest_files(paths, warnings):
        if path in seen:
            continue
        seen.add(path)
        name = _STDIN_NAME if path == STDIN else str(path)
        for n, doc in enumerate(parse_yaml(name, read_text(path, stdin)), 1):
            if doc is None:
                continue  # an empty document (a leading or trailing ``---``, only comments)
            for where, item in _items(f"{name}: document {n}", doc):
                reason = _skip_reason(item)
                if reason is None:
                    docs.append(item)
                else:
                    warnings.append(f"{where}: {reason}; ignored")
    return Manifests(snapshot_from_documents(docs), tuple(warnings))


def load(paths: Iterable[Path], stdin: TextIO | None = None) -> Snapshot:
    """:func:`read` without the warnings."""
    return read(paths, stdin).snapshot
