"""YAML for files an operator (or an attacker who can write one) hands the server: bounded work.

:func:`load` is ``yaml.safe_load`` plus three checks on the composed document, made before any
Python object is built from it:

- **alias expansion** ("billion laughs"): an alias (``*name``) re-uses the node of an anchor
  (``&name``); PyYAML shares the built object, but everything downstream -- pydantic, a plugin
  that copies a free-form ``metadata`` block into every answer, ``json.dumps`` -- walks it once
  per reference. Nine nested levels of nine aliases make a 600-byte file a billion values. The
  document is refused when its aliases, all expanded (nested ones too), add more than
  :data:`MAX_ALIAS_NODES` nodes to what the file itself writes.
- **recursive aliases** (``&a [*a]``): an infinite document; refused.
- **nesting depth** beyond :data:`MAX_DEPTH` levels, counted with aliases expanded (protobuf's
  own recursion limit is 100, so nothing deeper could reach Envoy anyway); refused.

The check is one walk over the distinct nodes (each node's expanded size is computed once), so it
costs the same as composing the document. libyaml's parser (``CSafeLoader``) is used when PyYAML
was built with it: it parses about ten times faster than the pure-Python one.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

#: at most this many nodes may come from expanding aliases (see the module docstring)
MAX_ALIAS_NODES = 100_000
#: deepest nesting of mappings and lists, aliases expanded
MAX_DEPTH = 100

_Loader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
#: a broken document up to this size is parsed again by PyYAML for a better message
_REPARSE_MAX_CHARS = 1024 * 1024
#: sizes are saturated here: a chain of aliases can double per level, and the exact count of an
#: exponential document is of no use (nor cheap: the integers grow a bit per level)
_SATURATED = 1 << 62


class UnsafeYAMLError(yaml.YAMLError):
    """The document is well-formed YAML whose expansion would be unbounded or too large."""


def load(text: str) -> Any:
    """``yaml.safe_load(text)``, refusing alias bombs, recursive aliases and deep nesting.

    :raises yaml.YAMLError: not YAML (the parser's error), or :class:`UnsafeYAMLError`.
    """
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        check(node)
        return loader.construct_document(node)
    except UnsafeYAMLError:
        raise
    except yaml.YAMLError as exc:
        if _Loader is yaml.SafeLoader or len(text) > _REPARSE_MAX_CHARS:
            raise
        # libyaml's messages carry no excerpt of the line; PyYAML's own parser says the same
        # with the line and a caret under the spot: worth a second parse of a broken file.
        raise _pure_python_error(text) or exc from None
    finally:
        loader.dispose()


def _pure_python_error(text: str) -> yaml.YAMLError | None:
    try:
        yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        return exc
    except RecursionError:  # deeper than the pure-Python composer can go
        return None
    return None


def check(root: Node) -> None:
    """Raise :class:`UnsafeYAMLError` if ``root``, aliases expanded, is too big, deep or infinite.

    An iterative post-order walk over the distinct mappings and lists (a deep document must not
    exhaust Python's stack); each one's expanded size and height is computed once. Scalars are
    counted where they occur: a leaf repeated through an alias adds one value, as writing it out
    would.
    """
    if type(root) is ScalarNode:
        return
    done: dict[int, tuple[int, int]] = {}  # id(node) -> (expanded size, height)
    on_path: set[int] = set()
    stack: list[Node] = [root]
    written = 0  # what the file holds: each collection once, with the scalars in it
    while stack:
        node = stack[-1]
        key = id(node)
        if key in done:  # reached twice before it was walked: walked once
            stack.pop()
            continue
        parts = _children(node)
        if key not in on_path:  # first visit: walk the collections under it first
            on_path.add(key)
            for child in parts:
                if type(child) is not ScalarNode:
                    child_key = id(child)
                    if child_key in on_path:
                        raise UnsafeYAMLError(
                            f"a recursive alias{_where(child)}: the document would be infinite"
                        )
                    if child_key not in done:
                        stack.append(child)
            continue
        stack.pop()
        on_path.discard(key)
        size, height, scalars = 1, 0, 0
        for child in parts:
            if type(child) is ScalarNode:
                scalars += 1
            else:
                child_size, child_height = done[id(child)]
                size += child_size
                height = max(height, child_height)
        if scalars:
            size += scalars
            height = max(height, 1)
        written += 1 + scalars
        height += 1
        if height > MAX_DEPTH:
            raise UnsafeYAMLError(
                f"nested more than {MAX_DEPTH} levels deep{_where(node)} (aliases expanded)"
            )
        done[key] = (min(size, _SATURATED), height)
    total = done[id(root)][0]
    added = total - written
    if added > MAX_ALIAS_NODES:
        shown = f"{added:,}" if total < _SATURATED else "astronomically many"
        raise UnsafeYAMLError(
            f"aliases (*name) expand to {shown} more values than the file writes, more than the "
            f"{MAX_ALIAS_NODES:,} allowed: an alias bomb? Write the repeated parts out, or "
            "reference a big block fewer times"
        )


def _children(node: Node) -> list[Node]:
    if type(node) is SequenceNode:
        return node.value  # type: ignore[no-any-return]
    if type(node) is MappingNode:
        return [part for pair in node.value for part in pair]
    return []


def _where(node: Node) -> str:
    mark = node.start_mark
    return f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
