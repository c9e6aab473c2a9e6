"""Manifests from files and directories (multi-document YAML) -> a :class:`Snapshot`."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from .. import model
from ..translate import Invalid, Snapshot

__all__ = ["ManifestError", "load", "snapshot_from_documents"]


class ManifestError(Exception):
    """A file that cannot be read or is not YAML."""


def _files(paths: Iterable[Path]) -> list[Path]:
    out: list[Path] = []
    for path in paths:
        if path.is_dir():
            out += sorted(p for p in path.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())
        elif path.exists():
            out.append(path)
        else:
            raise ManifestError(f"{path}: no such file or directory")
    return out


def _documents(path: Path) -> list[dict[str, Any]]:
    try:
        docs = list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
    except (OSError, yaml.YAMLError) as exc:
        raise ManifestError(f"{path}: {exc}") from exc
    out: list[dict[str, Any]] = []
    for doc in docs:
        if isinstance(doc, dict) and doc.get("kind") == "List":
            out += [d for d in doc.get("items") or [] if isinstance(d, dict)]
        elif isinstance(doc, dict):
            out.append(doc)
    return out


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
            continue  # a kind this controller does not read
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


def load(paths: Iterable[Path]) -> Snapshot:
    """Read every manifest under ``paths`` (files, or directories searched for *.yaml / *.yml)."""
    docs: list[dict[str, Any]] = []
    for path in _files(paths):
        docs += _documents(path)
    return snapshot_from_documents(docs)
