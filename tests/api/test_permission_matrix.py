"""The permission matrix every endpoint of /api/v1/tenants/<tenant>/… joins.

For each endpoint and method: anonymous → 401; the owner of another tenant → 404; each role of
the tenant → its expected status; an API token with exactly the scope the call needs → as its
user; a token missing that scope → 403; a token of another tenant → 404. Adding an endpoint
means adding a row here.
"""

from dataclasses import dataclass, field

import pytest

from tenancy.models import ApiToken

ROLES = ("viewer", "developer", "admin", "owner")
FN = "/api/v1/tenants/acme/functions/hello/"
T = "/api/v1/tenants/acme/"
VERSION = object()  # stands for the draft's current source version in a request body


@dataclass
class Row:
    name: str
    method: str
    url: str  # may use {prefix} (the owner's token), {version} (the draft's version), {invocation} (an id)
    expected: dict  # role → status
    body: object = None
    scope: str = field(default="")

    def __post_init__(self):
        if not self.scope:
            self.scope = "read" if self.method == "get" else "write"

    def resolve(self, world):
        url = self.url.format(prefix=world.owner_token_prefix, version=world.version,
                              invocation=world.invocation_id)
        body = self.body
        if isinstance(body, dict):
            body = {key: world.version if value is VERSION else value for key, value in body.items()}
        return url, body


def every(status):
    return dict.fromkeys(ROLES, status)


def roles(viewer, developer, admin, owner):
    return {"viewer": viewer, "developer": developer, "admin": admin, "owner": owner}


ROWS = [
    # tenant, members, tokens, audit trail
    Row("tenant get", "get", T, every(200)),
    Row("tenant patch", "patch", T, roles(403, 403, 403, 200), {"name": "Acme Inc"}),
    Row("members list", "get", T + "members/", every(200)),
    Row("members add", "post", T + "members/", roles(403, 403, 201, 201), {"username": "spare", "role": "viewer"}),
    Row("member get", "get", T + "members/acme-viewer/", every(200)),
    Row("member role", "patch", T + "members/acme-viewer/", roles(403, 403, 200, 200), {"role": "developer"}),
    Row("member remove", "delete", T + "members/acme-viewer/", roles(403, 403, 204, 204)),
    Row("tokens list", "get", T + "tokens/", every(200)),
    # A token's scopes stay within its creator's role: a viewer's "write" token is refused (400).
    Row("token create", "post", T + "tokens/", roles(400, 201, 201, 201), {"name": "ci", "scopes": ["write"]}),
    # Members who may not manage tokens do not see other people's tokens at all.
    Row("token get", "get", T + "tokens/{prefix}/", roles(404, 404, 200, 200)),
    Row("token revoke", "delete", T + "tokens/{prefix}/", roles(404, 404, 204, 204)),
    Row("audit events", "get", T + "audit-events/", roles(403, 403, 200, 200)),
    # functions
    Row("functions list", "get", T + "functions/", every(200)),
    Row("function create", "post", T + "functions/", roles(403, 201, 201, 201), {"name": "fresh"}),
    Row("function get", "get", FN, every(200)),
    Row("function patch", "patch", FN, roles(403, 200, 200, 200), {"description": "changed"}),
    Row("function delete", "delete", FN, roles(403, 403, 204, 204)),
    Row("files list", "get", FN + "files/", every(200)),
    Row("files replace", "put", FN + "files/", roles(403, 200, 200, 200),
        {"files": {"handler.py": "def handle(event, context):\n    return 'ok'\n"}, "base_version": VERSION}),
    Row("file get", "get", FN + "files/handler.py", every(200)),
    Row("file save", "put", FN + "files/handler.py", roles(403, 200, 200, 200),
        {"content": "def handle(event, context):\n    return 1\n", "base_version": VERSION}),
    Row("file delete", "delete", FN + "files/extra.py?base_version={version}", roles(403, 200, 200, 200)),
    Row("file rename", "post", FN + "files/extra.py", roles(403, 200, 200, 200),
        {"new_path": "lib/extra.py", "base_version": VERSION}),
    Row("revisions list", "get", FN + "revisions/", every(200)),
    Row("revision get", "get", FN + "revisions/1/", every(200)),
    Row("deploy", "post", FN + "deploy", roles(403, 202, 202, 202), {"message": "again"}, scope="deploy"),
    Row("rollback", "post", FN + "rollback", roles(403, 200, 200, 200), {"revision": 1}, scope="deploy"),
    Row("traffic get", "get", FN + "traffic", every(200)),
    Row("traffic set", "put", FN + "traffic", roles(403, 200, 200, 200), [{"revision": 1, "percent": 100}],
        scope="deploy"),
    Row("offline", "post", FN + "offline", roles(403, 200, 200, 200), scope="deploy"),
    Row("online", "post", FN + "online", roles(403, 200, 200, 200), scope="deploy"),
    Row("env list", "get", FN + "env/", every(200)),
    Row("env set", "put", FN + "env/", roles(403, 200, 200, 200), {"name": "COLOR", "value": "blue"}),
    Row("env delete", "delete", FN + "env/GREETING/", roles(403, 204, 204, 204)),
    Row("secrets list", "get", FN + "secrets/", every(200)),
    Row("secret set", "put", FN + "secrets/", roles(403, 200, 200, 200), {"name": "DB_PASSWORD", "value": "pw"}),
    Row("secret delete", "delete", FN + "secrets/API_KEY/", roles(403, 204, 204, 204)),
    Row("grants list", "get", FN + "grants/", every(200)),
    Row("grant set", "put", FN + "grants/", roles(403, 403, 200, 200), {"username": "friend", "level": "edit"}),
    Row("grant delete", "delete", FN + "grants/friend/", roles(403, 403, 204, 204)),
    Row("invocations", "get", FN + "invocations/", every(200)),
    Row("invocation get", "get", FN + "invocations/{invocation}/", every(200)),
]

ROW_IDS = [row.name for row in ROWS]




def call(client, row, world):
    url, body = row.resolve(world)
    return getattr(client, row.method)(url, body, format="json") if body is not None else getattr(
        client, row.method)(url)


def assert_error_shape(response):
    body = response.json()
    assert isinstance(body.get("code"), str) and body["code"], body
    assert isinstance(body.get("detail"), str) and body["detail"], body


@pytest.mark.parametrize("row", ROWS, ids=ROW_IDS)
@pytest.mark.parametrize("role", ROLES)
def test_role(row, role, shared_world, client_for):
    response = call(client_for(shared_world.members[role]), row, shared_world)
    assert response.status_code == row.expected[role], response.content
    if response.status_code >= 400:
        assert_error_shape(response)


@pytest.mark.parametrize("row", ROWS, ids=ROW_IDS)
def test_anonymous_is_401(row, shared_world, client_for):
    response = call(client_for(None), row, shared_world)
    assert response.status_code == 401
    assert response.json()["code"] == "not_authenticated"
    assert response["WWW-Authenticate"] == "Bearer"


@pytest.mark.parametrize("row", ROWS, ids=ROW_IDS)
def test_other_tenant_owner_is_404(row, shared_world, client_for):
    response = call(client_for(shared_world.outsider), row, shared_world)
    assert response.status_code == 404, response.content
    assert_error_shape(response)


@pytest.mark.parametrize("row", ROWS, ids=ROW_IDS)
def test_token_with_the_needed_scope_acts_as_its_user(row, shared_world, client_for, make_token):
    token = make_token(shared_world.members["owner"], shared_world.tenant, [row.scope])
    response = call(client_for(token=token), row, shared_world)
    assert response.status_code == row.expected["owner"], response.content


@pytest.mark.parametrize("row", ROWS, ids=ROW_IDS)
def test_token_without_the_needed_scope_is_403(row, shared_world, client_for, make_token):
    others = [scope for scope in ApiToken.Scope.values if scope != row.scope]
    token = make_token(shared_world.members["owner"], shared_world.tenant, others)
    response = call(client_for(token=token), row, shared_world)
    assert response.status_code == 403, response.content
    assert response.json()["code"] == "permission_denied"
    assert f"'{row.scope}' scope" in response.json()["detail"]


@pytest.mark.parametrize("row", ROWS, ids=ROW_IDS)
def test_token_of_another_tenant_is_404(row, shared_world, client_for, make_token):
    from tenancy.models import Tenant

    token = make_token(shared_world.outsider, Tenant.objects.get(slug="globex"), ApiToken.Scope.values)
    response = call(client_for(token=token), row, shared_world)
    assert response.status_code == 404, response.content
    assert_error_shape(response)


@pytest.mark.parametrize("row", ROWS, ids=ROW_IDS)
def test_token_of_a_member_is_bound_by_the_role(row, shared_world, client_for, make_token):
    """A viewer's token with every scope (made while they had a wider role) can still do only what a
    viewer may: a scope beyond the viewer's role is gone (403), the rest acts as the viewer."""
    from tenancy.permissions import ROLE_TOKEN_SCOPES

    token = make_token(shared_world.members["viewer"], shared_world.tenant, ["read"])
    ApiToken.objects.filter(prefix=token.split("_")[1]).update(scopes=ApiToken.Scope.values)
    response = call(client_for(token=token), row, shared_world)
    expected = row.expected["viewer"] if row.scope in ROLE_TOKEN_SCOPES["viewer"] else 403
    assert response.status_code == expected, response.content
