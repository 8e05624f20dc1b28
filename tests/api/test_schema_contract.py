"""What the endpoints answer matches what the OpenAPI schema says they answer, for every GET of
the permission matrix and for the error shape."""

import jsonschema
import pytest
from drf_spectacular.generators import SchemaGenerator

from tests.api.test_permission_matrix import ROWS


def _nullable_to_json_schema(node):
    """OpenAPI 3.0's ``nullable: true`` is JSON Schema's ``type: [..., "null"]``."""
    if isinstance(node, dict):
        node = {key: _nullable_to_json_schema(value) for key, value in node.items()}
        if node.pop("nullable", False):
            if "type" in node:
                node["type"] = [node["type"], "null"]
            else:
                node = {"anyOf": [node, {"type": "null"}]}
        return node
    if isinstance(node, list):
        return [_nullable_to_json_schema(item) for item in node]
    return node


@pytest.fixture(scope="module")
def openapi():
    return _nullable_to_json_schema(SchemaGenerator().get_schema(request=None, public=True))


def response_schema(openapi, path_template, method, status):
    operation = openapi["paths"][path_template][method]
    content = operation["responses"][str(status)]["content"]["application/json"]["schema"]
    return {**content, "components": openapi["components"]}


def template_of(openapi, url):
    """/api/v1/tenants/acme/functions/hello/files/handler.py → the schema's path template."""
    concrete = url.split("?")[0].split("/")
    # Literal paths first, so files/ is not taken for files/{path}.
    for template in sorted(openapi["paths"], key=lambda p: p.count("{")):
        parts = template.split("/")
        if len(parts) == len(concrete) and all(p == c or p.startswith("{") for p, c in zip(parts, concrete)):
            return template
    raise AssertionError(f"no schema path for {url}")


GET_ROWS = [row for row in ROWS if row.method == "get"]


@pytest.mark.parametrize("row", GET_ROWS, ids=[row.name for row in GET_ROWS])
def test_get_responses_match_the_schema(row, openapi, shared_world, client_for):
    url, _ = row.resolve(shared_world)
    response = client_for(shared_world.members["owner"]).get(url)
    assert response.status_code == 200
    schema = response_schema(openapi, template_of(openapi, url), "get", 200)
    jsonschema.validate(response.json(), schema)


@pytest.mark.parametrize("method,url,status,body", [
    ("post", "/api/v1/tenants/acme/functions/", 400, {"name": "Bad Name"}),
    ("post", "/api/v1/tenants/acme/functions/", 409, {"name": "hello"}),
    ("put", "/api/v1/tenants/acme/functions/hello/files/handler.py", 409, {"content": "", "base_version": 1}),
    ("patch", "/api/v1/tenants/acme/", 403, {"name": "x"}),
    ("get", "/api/v1/tenants/acme/functions/nope/", 404, None),
])
def test_error_responses_match_the_schema(method, url, status, body, openapi, shared_world, client_for):
    client = client_for(shared_world.members["developer"])
    response = getattr(client, method)(url, body, format="json") if body else getattr(client, method)(url)
    assert response.status_code == status, response.content
    jsonschema.validate(response.json(), response_schema(openapi, template_of(openapi, url), method, status))


def test_the_schemas_do_constrain(openapi):
    error = response_schema(openapi, "/api/v1/tenants/{tenant_slug}/", "patch", 403)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"detail": "no code"}, error)
    function = response_schema(openapi, "/api/v1/tenants/{tenant_slug}/functions/{function_name}/", "get", 200)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "x", "memory_mb": "lots"}, function)
