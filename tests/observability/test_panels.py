"""The URL builders of the embedded Grafana / Jaeger / Kibana panels, and the frame-src they imply."""

from urllib.parse import parse_qs, unquote, urlsplit

from django.test import override_settings

from observability import panels


def test_origin():
    assert panels.origin("https://grafana.example.com/sub/path?x=1") == "https://grafana.example.com"
    assert panels.origin("http://user:pw@127.0.0.1:3000") == "http://127.0.0.1:3000"
    assert panels.origin("javascript:alert(1)") == ""
    assert panels.origin("") == ""


def test_grafana_panel_url():
    url = panels.grafana_panel_url("https://g.example.com/", "nimbus-function", 3, namespace="nimbus-acme",
                                   function="hello", range_key="6h")
    parts = urlsplit(url)
    assert parts.path == "/d-solo/nimbus-function/nimbus-function"
    assert parse_qs(parts.query) == {"orgId": ["1"], "panelId": ["3"], "var-namespace": ["nimbus-acme"],
                                     "var-function": ["hello"], "from": ["now-6h"], "to": ["now"],
                                     "theme": ["light"]}


def test_jaeger_urls():
    url = panels.jaeger_search_url("http://jaeger:16686", "hello.nimbus-acme", range_key="24h")
    assert url == "http://jaeger:16686/search?service=hello.nimbus-acme&lookback=24h&limit=20&uiEmbed=v0"
    assert panels.jaeger_trace_url("http://jaeger:16686/", "abc") == "http://jaeger:16686/trace/abc?uiEmbed=v0"


def test_rison_and_kql_escaping():
    assert panels.rison_string("it's!") == "'it!'s!!'"
    assert panels.kql_string('a "b" \\c') == '"a \\"b\\" \\\\c"'


def test_kibana_discover_url():
    url = panels.kibana_discover_url("https://kibana.example.com", "logs-view", namespace="nimbus-acme",
                                     service="o'neil", range_key="15m")
    base, _, fragment = url.partition("#")
    assert base == "https://kibana.example.com/app/discover"
    fragment = unquote(fragment)
    assert fragment.startswith("/?embed=true&_g=(time:(from:now-15m,to:now))&_a=(")
    assert "index:'logs-view'" in fragment
    assert ("query:(language:kuery,query:'kubernetes.namespace_name : \"nimbus-acme\" and "
            "kubernetes.labels.serving_knative_dev/service : \"o!'neil\"')") in fragment
    # Nothing in the raw URL that would end the fragment or split the query early.
    assert " " not in url and '"' not in url and url.count("#") == 1


def test_panels_only_for_configured_tools(settings):
    with override_settings(GRAFANA_URL="", JAEGER_URL="", KIBANA_URL="", KIBANA_DATA_VIEW_ID=""):
        from django.conf import settings as live

        assert panels.panels_for(live, tenant_slug="acme", function_name="hello", range_key="1h") == {}
        assert panels.content_security_policy(live) == "frame-src 'none'; child-src 'none'"
    with override_settings(GRAFANA_URL="https://g.example.com", JAEGER_URL="http://jaeger:16686",
                           KIBANA_URL="https://k.example.com:5601/kb", KIBANA_DATA_VIEW_ID="v1"):
        from django.conf import settings as live

        found = panels.panels_for(live, tenant_slug="acme", function_name="hello", range_key="1h")
        assert set(found) == {"grafana", "jaeger", "kibana"}
        assert "var-namespace=nimbus-acme" in found["grafana"][0][1]
        assert "service=hello.nimbus-acme" in found["jaeger"]
        assert panels.frame_origins(live) == ["http://jaeger:16686", "https://g.example.com",
                                              "https://k.example.com:5601"]
    with override_settings(GRAFANA_URL="", JAEGER_URL="", KIBANA_URL="https://k.example.com", KIBANA_DATA_VIEW_ID=""):
        from django.conf import settings as live

        # Kibana without a data view is not embedded, so it is not framed either.
        assert panels.frame_origins(live) == []
