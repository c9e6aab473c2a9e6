"""ext_proc: the provider filter inside its composite wrapper, and its per-route settings."""

from __future__ import annotations

from envoy_data_plane.envoy.config.core.v3 import (
    TypedExtensionConfig,
)
from envoy_data_plane.envoy.extensions.common.matching.v3 import ExtensionWithMatcher
from envoy_data_plane.envoy.extensions.filters.http.composite.v3 import Composite, ExecuteFilterAction
from envoy_data_plane.envoy.extensions.filters.http.ext_proc import v3 as ext_proc
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpFilter,
)
from envoy_data_plane.envoy.extensions.matching.common_inputs.network.v3 import (
    DynamicMetadataInput,
    DynamicMetadataInputPathSegment,
)
from envoy_data_plane.envoy.extensions.matching.input_matchers.metadata import v3 as metadata_matcher
from envoy_data_plane.envoy.type.matcher.v3 import (
    ValueMatcher,
)
from envoy_data_plane.google.protobuf import Any
from envoy_data_plane.xds.core.v3 import TypedExtensionConfig as XdsTypedExtensionConfig
from envoy_data_plane.xds.type.matcher.v3 import (
    Matcher,
    MatcherMatcherList,
    MatcherMatcherListFieldMatcher,
    MatcherMatcherListPredicate,
    MatcherMatcherListPredicateSinglePredicate,
    MatcherOnMatch,
)

from .. import model
from .clusters import grpc_service
from .names import DISABLE_EXT_PROC_NS
from .packing import pack


def _mode(mode: model.ProcessingMode) -> ext_proc.ProcessingMode:
    return ext_proc.ProcessingMode(
        request_header_mode=ext_proc.ProcessingModeHeaderSendMode[mode.request_header_mode],
        response_header_mode=ext_proc.ProcessingModeHeaderSendMode[mode.response_header_mode],
        request_body_mode=ext_proc.ProcessingModeBodySendMode[mode.request_body_mode],
        response_body_mode=ext_proc.ProcessingModeBodySendMode[mode.response_body_mode],
        request_trailer_mode=ext_proc.ProcessingModeHeaderSendMode[mode.request_trailer_mode],
        response_trailer_mode=ext_proc.ProcessingModeHeaderSendMode[mode.response_trailer_mode],
    )


_CACHE_ACTION = {"FromResponse": "DEFAULT", "Clear": "CLEAR", "Retain": "RETAIN"}


def ext_proc_filter(name: str, spec: model.ExtProcProvider, cluster_name: str) -> HttpFilter:
    """ext_proc wrapped in a composite filter whose matcher skips it when global_disable/ext_proc ran."""
    forwarding = None
    if spec.metadata_options is not None and spec.metadata_options.forwarding is not None:
        f = spec.metadata_options.forwarding
        forwarding = ext_proc.MetadataOptions(
            forwarding_namespaces=ext_proc.MetadataOptionsMetadataNamespaces(
                typed=list(f.typed or ()), untyped=list(f.untyped or ())
            )
        )
    processor = ext_proc.ExternalProcessor(
        grpc_service=grpc_service(spec.grpc_service, cluster_name),
        failure_mode_allow=spec.fail_open,
        processing_mode=_mode(spec.processing_mode or model.ProcessingMode()),
        allow_mode_override=spec.allow_processing_mode_override,
        allowed_override_modes=[_mode(m) for m in spec.allowed_processing_mode_overrides or ()],
        message_timeout=model.parse_duration(spec.message_timeout) if spec.message_timeout else None,
        max_message_timeout=(
            model.parse_duration(spec.max_message_timeout) if spec.max_message_timeout else None
        ),
        stat_prefix=spec.stat_prefix or "",
        route_cache_action=ext_proc.ExternalProcessorRouteCacheAction[_CACHE_ACTION[spec.route_cache_action]],
        metadata_options=forwarding,
        request_attributes=list(spec.request_attributes or ()),
    )
    matcher = Matcher(
        matcher_list=MatcherMatcherList(
            matchers=[
                MatcherMatcherListFieldMatcher(
                    predicate=MatcherMatcherListPredicate(
                        single_predicate=MatcherMatcherListPredicateSinglePredicate(
                            input=XdsTypedExtensionConfig(
                                name="disable_ext_proc",
                                typed_config=pack(
                                    DynamicMetadataInput(
                                        filter=DISABLE_EXT_PROC_NS,
                                        path=[DynamicMetadataInputPathSegment(key="disable")],
                                    )
                                ),
                            ),
                            custom_match=XdsTypedExtensionConfig(
                                name="disable_ext_proc",
                                typed_config=pack(
                                    metadata_matcher.Metadata(
                                        value=ValueMatcher(bool_match=True), invert=True
                                    )
                                ),
                            ),
                        )
                    ),
                    on_match=MatcherOnMatch(
                        action=XdsTypedExtensionConfig(
                            name="composite-action",
                            typed_config=pack(
                                ExecuteFilterAction(
                                    typed_config=TypedExtensionConfig(
                                        name="envoy.filters.http.ext_proc", typed_config=pack(processor)
                                    )
                                )
                            ),
                        )
                    ),
                )
            ]
        )
    )
    config = ExtensionWithMatcher(
        extension_config=TypedExtensionConfig(name="composite", typed_config=pack(Composite())),
        xds_matcher=matcher,
    )
    return HttpFilter(name=name, disabled=True, typed_config=pack(config))


def ext_proc_per_route(policy: model.ExtProcPolicy) -> Any:
    mode = _mode(policy.processing_mode) if policy.processing_mode is not None else None
    return pack(ext_proc.ExtProcPerRoute(overrides=ext_proc.ExtProcOverrides(processing_mode=mode)))
