"""``Any`` packing without serialization, and the garbage-collector pause used while building."""

from __future__ import annotations

import contextlib
import copy
import gc
from collections.abc import Iterator
from typing import Any as TAny

import betterproto2
from envoy_data_plane.envoy.config.route.v3 import (
    FilterConfig,
)
from envoy_data_plane.google.protobuf import Any
from envoy_data_plane.message_pool import default_message_pool


class TypedAny(Any):
    """An ``Any`` that keeps its message typed until output, instead of serializing it now.

    ``Any.pack`` serializes at once, and the HTTP connection manager's ``Any`` embeds the whole
    RouteConfiguration, so packing during translation serialized everything (and ``to_dict``
    parsed it all back): 10 s for 1,000 routes. This subclass is still an ``Any`` to the
    dataclasses' validation; ``type_url`` comes from the message pool as in ``Any.pack``; the
    message was validated when it was built. :func:`to_dict` writes it without any round trip,
    and ``value`` still serializes on demand, so ``bytes(message)`` stays correct (for xDS).
    """

    # The subclass is not a generated dataclass: reuse Any's field metadata.
    _betterproto_meta = Any._betterproto  # type: ignore[arg-type]  # (betterproto2's classproperty typing)

    def __init__(self, message: betterproto2.Message) -> None:
        self._unknown_fields = b""
        self.type_url = default_message_pool.type_to_url[type(message)]
        self.message = message

    @property
    def value(self) -> bytes:  # type: ignore[override]  # read-only: derived from the message
        return bytes(self.message)

    def _validate(self) -> None:
        """Nothing to do: ``type_url`` is the pool's and the message was validated when built."""

    def __copy__(self, _: TAny = None) -> TypedAny:
        return TypedAny(self.message)

    def __deepcopy__(self, memo: TAny = None) -> TypedAny:
        return TypedAny(copy.deepcopy(self.message, memo))


@contextlib.contextmanager
def no_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector while building (or writing) a whole config.

    Translation and rendering create ~10^5 short-lived, acyclic objects next to a large live
    tree, and each generation-2 collection walks that tree: half of the render time for 1,000
    routes (bench/controller_bench.py). Reference counting still frees everything; nested use
    is fine (only the outermost one re-enables).
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def pack(message: betterproto2.Message) -> Any:
    return TypedAny(message)


def enable() -> Any:
    """``FilterConfig{config: {}}``: switches a ``disabled: true`` filter on for a scope."""
    return pack(FilterConfig(config=Any()))
