"""extsvc: one Python process serving Envoy's ext_authz, ext_proc and rate-limit services.

This module is the plugin-facing API; everything else is internal. ``extsvc.credentials`` holds
the credential helpers for authorizer plugins (plugin API too, imported from that module).
"""

from __future__ import annotations

from extsvc.errors import ConfigError, ExtsvcError, PluginError, StoreError
from extsvc.extproc.model import (
    BodyMode,
    Exchange,
    HeaderChanges,
    HttpMessage,
    Phase,
    Processor,
)
from extsvc.plugin.check import (
    CheckContext,
    Decision,
    Peer,
    ResponseHeader,
    ResponseHeaderAction,
)
from extsvc.plugin.context import PluginContext, PluginMetrics
from extsvc.plugin.markers import hookimpl, hookspec
from extsvc.plugin.protocols import Authorizer, Closable, IdentitySource, Startable
from extsvc.plugin.records import AuthorizerType, LimitStoreType, ProcessorType
from extsvc.ratelimit.algorithms import Op
from extsvc.ratelimit.store import LimitStore
from extsvc.remote import (
    RemoteFetchError,
    RemoteFetchMetrics,
    RemoteInvalidContent,
    RemoteStatusError,
    RemoteTimeout,
    RemoteTooLarge,
    RemoteUnreachable,
    fetch_bytes,
    fetch_json,
)
from extsvc.types import HeaderName, HeaderValue, Re2Pattern, Re2Regex, Regex

__version__ = "0.1.0"

__all__ = [
    "Authorizer",
    "AuthorizerType",
    "BodyMode",
    "CheckContext",
    "Closable",
    "ConfigError",
    "Decision",
    "Exchange",
    "ExtsvcError",
    "HeaderChanges",
    "HeaderName",
    "HeaderValue",
    "HttpMessage",
    "IdentitySource",
    "LimitStore",
    "LimitStoreType",
    "Op",
    "Peer",
    "Phase",
    "PluginContext",
    "PluginError",
    "PluginMetrics",
    "Processor",
    "ProcessorType",
    "Re2Pattern",
    "Re2Regex",
    "Regex",
    "RemoteFetchError",
    "RemoteFetchMetrics",
    "RemoteInvalidContent",
    "RemoteStatusError",
    "RemoteTimeout",
    "RemoteTooLarge",
    "RemoteUnreachable",
    "ResponseHeader",
    "ResponseHeaderAction",
    "Startable",
    "StoreError",
    "__version__",
    "fetch_bytes",
    "fetch_json",
    "hookimpl",
    "hookspec",
]
