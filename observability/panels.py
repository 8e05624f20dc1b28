"""Pure URL builders for the operators' own tools, embedded in the Monitor tab and filtered to one
function: a Grafana dashboard panel, the Jaeger search for the function's service, and Kibana
Discover with a KQL query on its namespace and Knative service label. No I/O here."""

from __future__ import annotations

from urllib.parse import quote, urlencode, urlsplit

# Panel ids of deploy/observability/grafana/nimbus-function.json (its tests hold them together).
GRAFANA_PANELS = {"requests": 1, "errors": 2, "latency": 3, "cold_starts": 4}
GRAFANA_SLUG = "nimbus-function"
GRAFANA_RANGES = {"15m": "now-15m", "1h": "now-1h", "6h": "now-6h", "24h": "now-24h", "7d": "now-7d"}
JAEGER_LOOKBACK = {"15m": "15m", "1h": "1h", "6h": "6h", "24h": "24h", "7d": "7d"}
# The kubernetes filter of fluent-bit (Replace_Dots On) stores pod labels with dots as underscores.
KIBANA_SERVICE_FIELD = "kubernetes.labels.serving_knative_dev/service"
KIBANA_NAMESPACE_FIELD = "kubernetes.namespace_name"


def origin(url: str) -> str:
    """``scheme://host[:port]`` of a URL, or "" when it is not an http(s) URL."""
    parts = urlsplit(url or "")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return ""
    return f"{parts.scheme}://{parts.netloc.rsplit('@', 1)[-1]}"


def grafana_panel_url(base: str, dashboard_uid: str, panel_id: int, *, namespace: str, function: str,
                      range_key: str = "1h", theme: str = "light") -> str:
    query = urlencode({"orgId": 1, "panelId": panel_id, "var-namespace": namespace, "var-function": function,
                       "from": GRAFANA_RANGES.get(range_key, "now-1h"), "to": "now", "theme": theme})
    return f"{base.rstrip('/')}/d-solo/{quote(dashboard_uid, safe='')}/{GRAFANA_SLUG}?{query}"


def jaeger_search_url(base: str, service: str, *, range_key: str = "1h", limit: int = 20) -> str:
    query = urlencode({"service": service, "lookback": JAEGER_LOOKBACK.get(range_key, "1h"), "limit": limit,
                       "uiEmbed": "v0"})
    return f"{base.rstrip('/')}/search?{query}"


def jaeger_trace_url(base: str, trace_id: str) -> str:
    return f"{base.rstrip('/')}/trace/{quote(trace_id, safe='')}?uiEmbed=v0"


def rison_string(value: str) -> str:
    """A Rison string literal: quoted with ', where ! escapes ' and itself."""
    return "'" + value.replace("!", "!!").replace("'", "!'") + "'"


def kql_string(value: str) -> str:
    """A KQL quoted value (a phrase: backslash escapes " and itself)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


# Kept readable in the address bar; everything else (spaces, quotes, #, &) is percent-encoded.
_RISON_SAFE = "!'(),:*-_.~/@$"


def kibana_discover_url(base: str, data_view_id: str, *, namespace: str, service: str,
                        range_key: str = "1h") -> str:
    kql = (f"{KIBANA_NAMESPACE_FIELD} : {kql_string(namespace)} and "
           f"{KIBANA_SERVICE_FIELD} : {kql_string(service)}")
    since = GRAFANA_RANGES.get(range_key, "now-1h")
    g = f"(time:(from:{since},to:now))"
    a = f"(index:{rison_string(data_view_id)},query:(language:kuery,query:{rison_string(kql)}))"
    return (f"{base.rstrip('/')}/app/discover#/?embed=true&_g={quote(g, safe=_RISON_SAFE)}"
            f"&_a={quote(a, safe=_RISON_SAFE)}")


def panels_for(settings, *, tenant_slug: str, function_name: str, range_key: str) -> dict:
    """What the Monitor tab embeds for one function with the given settings (empty when none are set)."""
    from observability import identity

    namespace = identity.namespace_for(tenant_slug)
    service = identity.service_for(function_name)
    found: dict = {}
    grafana = getattr(settings, "GRAFANA_URL", "")
    if origin(grafana):
        uid = getattr(settings, "GRAFANA_DASHBOARD_UID", "") or "nimbus-function"
        found["grafana"] = [(title, grafana_panel_url(grafana, uid, panel, namespace=namespace, function=service,
                                                     range_key=range_key))
                            for title, panel in (("Requests", GRAFANA_PANELS["requests"]),
                                                 ("Latency", GRAFANA_PANELS["latency"]))]
    jaeger = getattr(settings, "JAEGER_URL", "")
    if origin(jaeger):
        found["jaeger"] = jaeger_search_url(jaeger, identity.trace_service_for(tenant_slug, function_name),
                                            range_key=range_key)
    kibana = getattr(settings, "KIBANA_URL", "")
    if origin(kibana) and getattr(settings, "KIBANA_DATA_VIEW_ID", ""):
        found["kibana"] = kibana_discover_url(kibana, settings.KIBANA_DATA_VIEW_ID, namespace=namespace,
                                              service=service, range_key=range_key)
    return found


def frame_origins(settings) -> list[str]:
    """The origins the Monitor page may frame: exactly the configured tools."""
    urls = [getattr(settings, "GRAFANA_URL", ""), getattr(settings, "JAEGER_URL", "")]
    if getattr(settings, "KIBANA_DATA_VIEW_ID", ""):
        urls.append(getattr(settings, "KIBANA_URL", ""))
    return sorted({o for o in map(origin, urls) if o})


def content_security_policy(settings) -> str:
    origins = frame_origins(settings)
    sources = " ".join(origins) if origins else "'none'"
    return f"frame-src {sources}; child-src {sources}"
