"""DRF's browsable API renders every endpoint for a signed-in browser, from local static files."""

import pytest

from tests.api.test_permission_matrix import ROWS

URLS = sorted({row.url for row in ROWS if "{" not in row.url and "?" not in row.url} | {"/api/v1/tenants/"})


@pytest.mark.parametrize("url", URLS)
def test_endpoint_renders_as_html(url, shared_world, client_for):
    response = client_for(shared_world.members["owner"]).get(url, HTTP_ACCEPT="text/html")
    # Verbs that only take POST answer 405, rendered as a page with their form.
    assert response.status_code in (200, 405), response.content[:2000]
    html = response.content.decode()
    assert "<html" in html
    assert "/static/rest_framework/" in html
    assert "cdn." not in html
    assert f"HTTP {response.status_code}" in html
