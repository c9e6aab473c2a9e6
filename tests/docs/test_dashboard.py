"""helm/extsvc/dashboards/extsvc.json, the Grafana dashboard shipped with the chart.

A dashboard fails quietly: a misspelt metric or a label extsvc does not have draws an empty
panel, never an error. So the panels' queries are read here with a small PromQL tokenizer and
checked against what a live extsvc exports after ext_authz, ext_proc and rate-limit traffic;
the layout is checked without a server.
"""

from __future__ import annotations

import itertools
import json
import re
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from extsvc.plugin.host import PluginHost
from extsvc.testing import ScriptPlugin, authz_stub, check_request, running_server
from extsvc.testing.extproc import headers_message
from extsvc.testing.harness import ExtsvcProcess, wait_for_window_room
from extsvc.testing.otlp import OtlpCollector

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "helm" / "extsvc" / "dashboards" / "extsvc.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
GRID_COLUMNS = 24

# -- a small PromQL reader ---------------------------------------------------------------------

#: PromQL's functions (Prometheus 2.x and 3.x): an identifier followed by "(" must be one of these
#: or an aggregation, so a misspelt function is caught as well as a misspelt metric.
FUNCTIONS = frozenset({
    "abs", "absent", "absent_over_time", "acos", "acosh", "asin", "asinh", "atan", "atanh",
    "avg_over_time", "ceil", "changes", "clamp", "clamp_max", "clamp_min", "cos", "cosh",
    "count_over_time", "day_of_month", "day_of_week", "day_of_year", "days_in_month", "deg",
    "delta", "deriv", "double_exponential_smoothing", "end", "exp", "floor", "histogram_avg",
    "histogram_count", "histogram_fraction", "histogram_quantile", "histogram_stddev",
    "histogram_stdvar", "histogram_sum", "holt_winters", "hour", "idelta", "increase", "info",
    "irate", "label_join", "label_replace", "last_over_time", "ln", "log10", "log2",
    "mad_over_time", "max_over_time", "min_over_time", "minute", "month", "pi",
    "predict_linear", "present_over_time", "quantile_over_time", "rad", "rate", "resets",
    "round", "scalar", "sgn", "sin", "sinh", "sort", "sort_by_label", "sort_by_label_desc",
    "sort_desc", "sqrt", "start", "stddev_over_time", "stdvar_over_time", "sum_over_time",
    "tan", "tanh", "time", "timestamp", "vector", "year",
})
#: Aggregation operators; unlike functions they may be followed by a by/without clause.
AGGREGATIONS = frozenset({
    "avg", "bottomk", "count", "count_values", "group", "limit_ratio", "limitk", "max", "min",
    "quantile", "stddev", "stdvar", "sum", "topk",
})
#: Keywords whose parenthesised list names labels, not series.
GROUPING = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
KEYWORDS = GROUPING | {"bool", "and", "or", "unless", "offset", "atan2", "inf", "nan"}
#: Labels Prometheus adds to every scraped series (the target's); queries may group by them.
TARGET_LABELS = frozenset({"instance", "job"})
#: What a metric name may start with: extsvc's own metrics and its process and Python collectors.
OUR_PREFIXES = ("extsvc_", "process_", "python_")

_TOKEN = re.compile(
    r"""
    (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
    |(?P<variable>\$\{[^}]*\}|\$\w+|\[\[[^\]]*\]\])
    |(?P<number>0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?[a-zA-Z]*)
    |(?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)
    |(?P<open>[({\[])
    |(?P<close>[)}\]])
    |(?P<other>[^\s"'`$\w(){}\[\]]+)
    |(?P<space>\s+)
    """,
    re.VERBOSE,
)
_CLOSING = {"(": ")", "{": "}", "[": "]"}


@dataclass(frozen=True)
class Query:
    """What one PromQL expression refers to."""

    metrics: frozenset[str]
    labels: frozenset[str]
    functions: frozenset[str]
    problems: tuple[str, ...]


def tokens(expr: str) -> list[tuple[str, str]]:
    """``(kind, text)`` pairs, spaces dropped. String literals (label values, label_replace's
    arguments) and Grafana variables are single tokens, so nothing inside them is read as a name."""
    out, position = [], 0
    while position < len(expr):
        match = _TOKEN.match(expr, position)
        if match is None:
            raise ValueError(f"cannot read {expr[position:position + 20]!r} in {expr!r}")
        position = match.end()
        kind = match.lastgroup or ""
        if kind != "space":
            out.append((kind, match.group()))
    return out


def _closing(items: Sequence[tuple[str, str]], start: int) -> int:
    """The index of the bracket closing the one at ``start``."""
    depth = 0
    for index in range(start, len(items)):
        kind, text = items[index]
        if kind == "open":
            depth += 1
        elif kind == "close":
            depth -= 1
            if depth == 0:
                if text != _CLOSING[items[start][1]]:
                    raise ValueError(f"{items[start][1]!r} closed by {text!r}")
                return index
    raise ValueError(f"unclosed {items[start][1]!r}")


def read_promql(expr: str) -> Query:
    """The metric names, label names and functions of ``expr``.

    A metric name is an identifier that is not a function call, keyword or label: label names are
    those in ``{...}`` matchers and in ``by``/``without``/``on``/``ignoring``/``group_left``/
    ``group_right`` lists; ``[...]`` holds only durations."""
    items = tokens(expr)
    metrics: set[str] = set()
    labels: set[str] = set()
    functions: set[str] = set()
    problems: list[str] = []
    index = 0
    while index < len(items):
        kind, text = items[index]
        following = items[index + 1][1] if index + 1 < len(items) else ""
        if text == "{":
            end = _closing(items, index)
            inside = items[index + 1:end]
            # a matcher is `label op "value"`: the identifier right before an operator
            for (k, name), (_, op) in itertools.pairwise(inside):
                if k == "ident" and op in ("=", "!=", "=~", "!~"):
                    labels.add(name)
            index = end + 1
            continue
        if text == "[":
            index = _closing(items, index) + 1
            continue
        if kind == "ident":
            word = text.lower()
            if word in GROUPING and following == "(":
                end = _closing(items, index + 1)
                labels.update(t for k, t in items[index + 2:end] if k == "ident")
                index = end + 1
                continue
            if word in AGGREGATIONS and following.lower() in ("by", "without", "("):
                functions.add(text)
            elif following == "(":
                functions.add(text)
                if text not in FUNCTIONS:
                    problems.append(f"unknown PromQL function {text}()")
            elif word not in KEYWORDS:
                metrics.add(text)
        index += 1
    if "__name__" in labels:
        problems.append("selects series by __name__: name the metric instead")
    return Query(frozenset(metrics), frozenset(labels), frozenset(functions), tuple(problems))


_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?:(?P<expr>.*),\s*)?(?P<label>\w+)\s*\)\s*$", re.S)


def read_variable_query(query: str) -> Query:
    """A Grafana Prometheus variable query: ``label_values([series,] label)``,
    ``query_result(expr)`` or a plain expression."""
    values = _LABEL_VALUES.match(query)
    if values:
        inner = read_promql(values["expr"] or "")
        return Query(inner.metrics, inner.labels | {values["label"]}, inner.functions, inner.problems)
    result = re.fullmatch(r"\s*query_result\((.*)\)\s*", query, re.S)
    return read_promql(result[1] if result else query)


def test_the_tokenizer_skips_functions_labels_strings_and_durations() -> None:
    query = read_promql(
        'histogram_quantile(0.99, sum by (le, service) (label_replace(rate('
        'extsvc_request_duration_seconds_bucket{policy=~"$policy", code!="not_a_metric"}'
        '[$__rate_interval] offset 5m), "service", "$1", "exported_service", "(.+)")))'
        " / on (service) group_left (policy) sum without (instance) (process_open_fds) > bool 1e-9"
    )
    assert query.metrics == {"extsvc_request_duration_seconds_bucket", "process_open_fds"}
    assert query.labels == {"le", "service", "policy", "code", "instance"}
    assert query.functions == {"histogram_quantile", "sum", "label_replace", "rate"}
    assert query.problems == ()
    typo = read_promql("histogram_quantil(0.5, x)")
    assert typo.problems == ("unknown PromQL function histogram_quantil()",)
    assert read_promql('{__name__="extsvc_shed_total"}').problems
    assert read_variable_query("label_values(extsvc_request_duration_seconds_count, policy)") == Query(
        frozenset({"extsvc_request_duration_seconds_count"}), frozenset({"policy"}), frozenset(), ()
    )
    assert read_variable_query("label_values(policy)").metrics == set()


# -- the dashboard -----------------------------------------------------------------------------


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def all_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those inside a collapsed row."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str, Query]]:
    """``(where, expression, what it refers to)`` for every panel target and query variable."""
    for panel in all_panels(dashboard):
        for target in panel.get("targets", []):
            where = f"panel {panel['id']} {panel['title']!r} target {target.get('refId')}"
            yield where, target["expr"], read_promql(target["expr"])
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        raw = variable["query"]
        texts = [raw["query"] if isinstance(raw, dict) else raw, variable.get("definition", "")]
        for text in dict.fromkeys(t for t in texts if t):
            yield f"variable ${variable['name']}", text, read_variable_query(text)


def test_the_dashboard_is_grafana_json_with_unique_ids_and_a_tiled_grid() -> None:
    dashboard = load_dashboard()
    assert dashboard["schemaVersion"] >= 36 and dashboard["uid"] and dashboard["title"]
    [datasource] = [v for v in dashboard["templating"]["list"] if v["name"] == "datasource"]
    assert (datasource["type"], datasource["query"]) == ("datasource", "prometheus")

    panels = list(all_panels(dashboard))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(i for i in ids if ids.count(i) > 1)}"

    # Grafana moves overlapping panels around on load: the layout would not be the one written.
    occupied: dict[tuple[int, int], dict[str, Any]] = {}
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] >= 0 and grid["y"] >= 0, panel["title"]
        assert grid["x"] + grid["w"] <= GRID_COLUMNS, f"{panel['title']!r} is wider than the grid"
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                other = occupied.setdefault((x, y), panel)
                assert other is panel, f"{panel['title']!r} overlaps {other['title']!r} at x={x} y={y}"

    for panel in panels:
        assert panel.get("title"), f"panel {panel['id']} has no title"
        if panel["type"] == "row":  # a row only groups: it queries nothing
            assert not panel.get("targets"), panel["title"]
            continue
        assert panel.get("description", "").strip(), f"{panel['title']!r} has no description"
        assert panel.get("datasource") == DATASOURCE, f"{panel['title']!r}: {panel.get('datasource')}"
        assert panel["targets"], f"{panel['title']!r} has no query"
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), f"{panel['title']!r}: duplicate refIds {refs}"
        for target in panel["targets"]:
            assert target.get("datasource", DATASOURCE) == DATASOURCE, panel["title"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            assert variable["datasource"] == DATASOURCE, variable["name"]


def test_every_query_reads_as_promql_over_our_metrics_only() -> None:
    problems = []
    for where, expr, query in queries(load_dashboard()):
        problems += [f"{where}: {p}  in  {expr}" for p in query.problems]
        if not query.metrics and not where.startswith("variable"):
            problems.append(f"{where}: names no metric  in  {expr}")
        problems += [
            f"{where}: {m} is not an extsvc metric (extsvc_*, process_*, python_*)"
            for m in sorted(query.metrics) if not m.startswith(OUR_PREFIXES)
        ]
    assert not problems, "\n".join(problems)


#: What the dashboard is for: decisions, ext_proc streams, latency per service, step latency and
#: errors, gRPC codes, rate-limit outcomes, store errors and latency, shedding, reloads, decision
#: log drops, pods and processes.
REQUIRED = {
    "extsvc_authz_decisions_total",
    "extsvc_extproc_streams_total",
    "extsvc_request_duration_seconds_bucket",
    "extsvc_step_duration_seconds_bucket",
    "extsvc_extproc_processor_duration_seconds_bucket",
    "extsvc_step_errors_total",
    "extsvc_extproc_processor_errors_total",
    "extsvc_grpc_handled_total",
    "extsvc_ratelimit_over_limit_total",
    "extsvc_ratelimit_within_limit_total",
    "extsvc_ratelimit_near_limit_total",
    "extsvc_ratelimit_shadow_mode_total",
    "extsvc_ratelimit_responses_total",
    "extsvc_ratelimit_store_errors_total",
    "extsvc_ratelimit_store_duration_seconds_bucket",
    "extsvc_shed_total",
    "extsvc_config_reloads_total",
    "extsvc_config_generation",
    "extsvc_decision_log_dropped_total",
    "extsvc_build_info",
    "extsvc_extproc_active_streams",
    "process_resident_memory_bytes",
}


def test_the_dashboard_covers_what_was_asked_for() -> None:
    used = {m for _, _, q in queries(load_dashboard()) for m in q.metrics}
    assert not REQUIRED - used, f"no panel uses {sorted(REQUIRED - used)}"
    exprs = " ".join(expr for _, expr, _ in queries(load_dashboard()))
    # latency per service: quantiles grouped by service, not one line for all three services
    assert re.search(r"sum by \(le, service\) \(.*extsvc_request_duration_seconds_bucket", exprs)


def test_panels_on_per_process_metrics_say_they_go_dark_with_workers() -> None:
    """process_* and python_* are one process's (docs/operators.md): not exported with --workers.
    A panel built on them must say so, or an empty panel reads as a broken scrape."""
    for panel in all_panels(load_dashboard()):
        used = {m for t in panel.get("targets", []) for m in read_promql(t["expr"]).metrics}
        if any(m.startswith(("process_", "python_")) for m in used):
            assert "--workers" in panel["description"], panel["title"]


# -- against a live extsvc ---------------------------------------------------------------------

DOMAIN = """
domain: shop
descriptors:
  - key: user
    rate_limit: {unit: hour, requests_per_unit: 5, name: per-user}
  - key: trial
    rate_limit: {unit: hour, requests_per_unit: 1, name: trial}
    shadow_mode: true
"""
CONFIG = """
version: 1
default_policy: web
policies:
  web:
    steps:
      - plugin: header-match
        config:
          match: {path: {prefix: /public}}
          on_match: allow
      - plugin: deny
        config: {status: 401}
  flaky:
    steps:
      - {name: boom, plugin: script, config: {answer: raise}}
extproc:
  default_policy: edge
  policies:
    edge:
      processors:
        - plugin: headers
          config:
            request: {set: {x-gateway: extsvc}}
    flaky-proc:
      on_error: continue
      processors:
        - {plugin: script, config: {phases: [request_headers], fail: true}}
ratelimit:
  config_dir: domains
  local_cache: true
"""

#: Families the traffic below does not reach (they need overload, a failing or a waiting store,
#: a request over a size cap, a broken admin client): a scrape shows their names but no labels,
#: so queries on them are checked for names only. Every other family the dashboard uses must
#: have samples, so that the labels its queries use are checked too.
QUIET = {
    "extsvc_shed_total",
    "extsvc_ratelimit_store_errors_total",
    "extsvc_ratelimit_store_duration_seconds_bucket",
    "extsvc_request_rejected_total",
    "extsvc_admin_errors_total",
}


@dataclass
class Scrape:
    """One ``/metrics`` text: what Prometheus could query, and the labels seen on each name."""

    names: set[str]
    labels: dict[str, set[str]]
    sampled: set[str]
    values: dict[tuple[str, frozenset[tuple[str, str]]], float]

    @classmethod
    def parse(cls, text: str) -> Scrape:
        # The `# TYPE` lines say what each family is; Prometheus stores the sample names, so a
        # histogram is queried as name_bucket/_sum/_count, never by its bare name.
        names: set[str] = set()
        for line in text.splitlines():
            if line.startswith("# TYPE "):
                _, _, name, kind = line.split(maxsplit=3)
                if kind == "histogram":
                    names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
                elif kind == "summary":
                    names |= {name, f"{name}_sum", f"{name}_count"}
                elif kind == "counter" and not name.endswith("_total"):  # OpenMetrics spelling
                    names.add(f"{name}_total")
                else:
                    names.add(name)
        labels: dict[str, set[str]] = defaultdict(set)
        values = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels[sample.name] |= set(sample.labels)
                values[sample.name, frozenset(sample.labels.items())] = sample.value
        return cls(names, dict(labels), set(labels), values)


def unknown_references(dashboard: dict[str, Any], scrape: Scrape) -> list[str]:
    """Each metric a query names that the scrape lacks, and each label it uses that none of its
    metrics carries (checked where every metric of the query has samples to show its labels)."""
    problems = []
    for where, _, query in queries(dashboard):
        missing = sorted(query.metrics - scrape.names)
        problems += [f"{where}: {m} is not exported by extsvc" for m in missing]
        if not query.metrics or not query.metrics <= scrape.sampled:
            continue
        known = set(TARGET_LABELS).union(*(scrape.labels[m] for m in query.metrics))
        problems += [
            f"{where}: label {label!r} is on none of {sorted(query.metrics)}"
            for label in sorted(query.labels - known)
        ]
    return problems


def rl_request(domain: str, key: str, value: str) -> Any:
    entry = ratelimit_pb2.RateLimitDescriptor.Entry(key=key, value=value)
    return rls_pb2.RateLimitRequest(
        domain=domain, descriptors=[ratelimit_pb2.RateLimitDescriptor(entries=[entry])]
    )


async def extproc_stream(channel: grpc.aio.Channel, authority: str = "") -> list[Any]:
    """One ext_proc stream: request headers (no body), then response headers."""
    stub = external_processor_pb2_grpc.ExternalProcessorStub(channel)

    async def messages() -> AsyncIterator[Any]:
        yield headers_message(end_of_stream=True, modes=("none", "none"))
        yield headers_message(response=True)

    metadata = [("x-extsvc-authority", authority)] if authority else []
    return [answer async for answer in stub.Process(messages(), metadata=metadata, timeout=5)]


async def send_traffic(channel: grpc.aio.Channel) -> None:
    """Some of every kind: ext_authz allow/deny/error/unknown policy, ext_proc ok and failing
    processor streams, rate-limit within/near/over/shadow/unknown domain."""
    authz = authz_stub(channel)
    allowed = await authz.Check(check_request("/public/x"), timeout=5)
    denied = await authz.Check(check_request("/private"), timeout=5)
    failed = await authz.Check(check_request("/", context_extensions={"extsvc-policy": "flaky"}), timeout=5)
    await authz.Check(check_request("/", context_extensions={"extsvc-policy": "nope"}), timeout=5)
    assert (allowed.status.code, denied.denied_response.status.code) == (0, 401)
    assert failed.denied_response.status.code == 503  # on_error: deny, after the step raised

    assert len(await extproc_stream(channel)) == 2
    assert len(await extproc_stream(channel, authority="flaky-proc")) == 2

    limits = rls_pb2_grpc.RateLimitServiceStub(channel)
    answers = [await limits.ShouldRateLimit(rl_request("shop", "user", "u1"), timeout=5) for _ in range(7)]
    over = rls_pb2.RateLimitResponse.OVER_LIMIT
    assert [a.overall_code == over for a in answers] == [False] * 5 + [True] * 2
    for _ in range(2):  # over a shadow_mode limit: counted, answered OK
        await limits.ShouldRateLimit(rl_request("shop", "trial", "t1"), timeout=5)
    await limits.ShouldRateLimit(rl_request("nowhere", "user", "u1"), timeout=5)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    (tmp_path / "domains").mkdir()
    (tmp_path / "domains" / "shop.yaml").write_text(DOMAIN)
    path = tmp_path / "extsvc.yaml"
    path.write_text(CONFIG)
    return path


async def test_every_query_names_metrics_and_labels_a_live_extsvc_exports(config: Path) -> None:
    wait_for_window_room(3600)  # the limits are per hour of the real clock: never across its end
    script = ScriptPlugin()
    host = PluginHost.create(extra_plugins=[("script", script)], load_entry_points=False)
    # one decision record a second: the rest are dropped, so the drop counter has samples too;
    # traced, to a collector of the test's, so that the exported spans are counted
    with OtlpCollector() as collector:
        async with running_server(config, host=host, decision_log_max_per_second=1,
                                  tracing_endpoint=collector.endpoint) as server:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
                await send_traffic(channel)
            assert server.tracing is not None and server.tracing.flush()
            async with httpx.AsyncClient(timeout=5) as client:
                response = await client.get(f"http://127.0.0.1:{server.admin_port}/metrics")
    assert response.status_code == 200
    scrape = Scrape.parse(response.text)
    dashboard = load_dashboard()

    problems = unknown_references(dashboard, scrape)
    assert not problems, "\n".join(problems)

    # The traffic reached all three services, so the per-service panels have something to show.
    durations = {
        dict(labels)["service"] for name, labels in scrape.values
        if name == "extsvc_request_duration_seconds_count"
    }
    assert {"ext_authz", "ext_proc", "ratelimit"} <= durations
    used = {m for _, _, q in queries(dashboard) for m in q.metrics}
    silent = used - scrape.sampled
    assert silent <= QUIET, f"no samples after the traffic (labels unchecked): {sorted(silent - QUIET)}"


def test_the_live_check_names_the_panel_and_the_unknown_metric() -> None:
    dashboard = {
        "panels": [{"id": 7, "title": "Typo", "targets": [
            {"refId": "A", "expr": 'sum by (policy, colour) (rate(extsvc_authz_decisionz_total[5m]))'},
            {"refId": "B", "expr": "sum by (colour) (rate(extsvc_shed_total[5m]))"},
        ]}],
        "templating": {"list": []},
    }
    scrape = Scrape.parse(
        "# TYPE extsvc_shed_total counter\n"
        'extsvc_shed_total{service="ext_proc"} 1.0\n'
    )
    assert unknown_references(dashboard, scrape) == [
        "panel 7 'Typo' target A: extsvc_authz_decisionz_total is not exported by extsvc",
        "panel 7 'Typo' target B: label 'colour' is on none of ['extsvc_shed_total']",
    ]


def test_with_workers_the_pod_level_panels_still_have_their_metrics(tmp_path: Path) -> None:
    """--workers 2: one scrape sums both workers (multi-process mode). extsvc_build_info stays one
    series, so count(extsvc_build_info) counts pods; the process and Python collectors are gone,
    which the panels built on them say (see the test above)."""
    config = tmp_path / "extsvc.yaml"
    config.write_text("default_policy: p\npolicies:\n  p:\n    steps: [{plugin: allow}]\n")
    with ExtsvcProcess(config, args=["--workers", "2"]) as extsvc:
        status, text = extsvc.admin("/metrics")
    assert status == 200
    scrape = Scrape.parse(text)
    per_process = sorted(n for n in scrape.names if n.startswith(("process_", "python_")))
    assert per_process == []
    build = [key for key in scrape.values if key[0] == "extsvc_build_info"]
    assert len(build) == 1 and "pid" not in dict(build[0][1])
    for name in ("extsvc_extproc_active_streams", "extsvc_config_generation"):
        assert name in scrape.sampled
    # What the pod-level panels use is there, other than the per-process collectors.
    used = {m for _, _, q in queries(load_dashboard()) for m in q.metrics}
    pod_level = {"extsvc_build_info", "extsvc_extproc_active_streams", "extsvc_config_generation",
                 "extsvc_decision_stream_readers"}
    assert pod_level <= used and pod_level <= scrape.names
