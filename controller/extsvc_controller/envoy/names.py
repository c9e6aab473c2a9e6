"""Filter names, metadata namespaces and fixed texts shared by the config builders."""

from __future__ import annotations

# Metadata namespaces of kgateway's global-disable filters (docs/internals/kgateway-translation.md §3.5).
DISABLE_EXT_AUTH_NS = "dev.kgateway.disable_ext_auth"
DISABLE_EXT_PROC_NS = "dev.kgateway.disable_ext_proc"
DISABLE_EXT_AUTH = "global_disable/ext_auth"
DISABLE_EXT_PROC = "global_disable/ext_proc"
LOCAL_RATELIMIT = "ratelimit/local"
ROUTER = "envoy.filters.http.router"
REPLACED_BODY = "invalid route configuration detected and replaced with a direct response."
