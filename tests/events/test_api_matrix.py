"""The permission matrix for the trigger, retry-policy, delivery, dead-letter and sequence
endpoints, in the shape of tests/api/test_permission_matrix.py: anonymous → 401, another tenant's
owner → 404, each role → its status, a token with the needed scope → as its user, without it →
403, another tenant's token → 404."""

from dataclasses import dataclass, field

import pytest

from functions.models import Delivery
from tenancy.models import ApiToken, Tenant
from tests.api.conftest import client_for, make_token  # noqa: F401 - fixtures reused as they are

ROLES = ("viewer", "developer", "admin", "owner")
FN = "/api/v1/tenants/acme/functions/hello/"
SEQ = "/api/v1/tenants/acme/sequences/"


@dataclass
class Row:
    name: str
    method: str
    url: str  # may use {dead} (a dead letter's id) and {delivery} (a finished delivery's id)
    expected: dict
    body: object = None
    scope: str = field(default="")

    def __post_init__(self):
        if not self.scope:
            self.scope = "read" if self.method == "get" else "write"


def every(status):
    return dict.fromkeys(ROLES, status)


def writers(status):
    return {"viewer": 403, "developer": status, "admin": status, "owner": status}


ROWS = [
    Row("triggers list", "get", FN + "triggers/", every(200)),
    Row("trigger create", "post", FN + "triggers/", writers(201), {"name": "hourly", "kind": "cron",
                                                                   "schedule": "0 * * * *"}),
    Row("trigger get", "get", FN + "triggers/nightly/", every(200)),
    Row("trigger patch", "patch", FN + "triggers/nightly/", writers(200), {"enabled": False}),
    Row("trigger delete", "delete", FN + "triggers/nightly/", writers(204)),
    Row("retry policy get", "get", FN + "retry-policy", every(200)),
    Row("retry policy put", "put", FN + "retry-policy", writers(200), {"max_attempts": 5}),
    Row("deliveries", "get", FN + "deliveries/", every(200)),
    Row("delivery get", "get", FN + "deliveries/{delivery}/", every(200)),
    Row("dead letters", "get", FN + "dead-letters/", every(200)),
    Row("dead letter replay", "post", FN + "dead-letters/{dead}/replay", writers(202), scope="deploy"),
    Row("dead letter discard", "delete", FN + "dead-letters/{dead}/", writers(204), scope="deploy"),
    Row("sequences list", "get", SEQ, every(200)),
    Row("sequence create", "post", SEQ, writers(201), {"name": "other", "functions": ["hello"]}),
    Row("sequence get", "get", SEQ + "flow/", every(200)),
    Row("sequence delete", "delete", SEQ + "flow/", writers(204)),
    Row("sequence start", "post", SEQ + "flow/start", writers(202), {"input": {"n": 1}}, scope="deploy"),
]
IDS = [row.name for row in ROWS]


@pytest.fixture
def world(function, members, outsider):
    from functions.services_triggers import sequence_create, trigger_create
    from functions.triggers import queue

    trigger_create(acting_user=members["developer"], function=function, name="nightly", kind="cron",
                   schedule="0 3 * * *")
    dead = queue.enqueue(function=function, source="async")
    done = queue.enqueue(function=function, source="async")
    Delivery.objects.filter(pk=dead.pk).update(state="dead", attempts=3)
    Delivery.objects.filter(pk=done.pk).update(state="succeeded", attempts=1, result_status=200, result_body=b"ok")
    sequence_create(acting_user=members["developer"], tenant=function.tenant, name="flow", functions=["hello"])
    return {"members": members, "outsider": outsider, "dead": dead.pk, "delivery": done.pk}


def call(client, row, world):
    url = row.url.format(dead=world["dead"], delivery=world["delivery"])
    method = getattr(client, row.method)
    return method(url, row.body, format="json") if row.body is not None else method(url)


@pytest.mark.django_db
@pytest.mark.parametrize("row", ROWS, ids=IDS)
@pytest.mark.parametrize("role", ROLES)
def test_role(row, role, world, client_for):  # noqa: F811
    response = call(client_for(world["members"][role]), row, world)
    assert response.status_code == row.expected[role], response.content
    if response.status_code >= 400:
        body = response.json()
        assert body["code"] and body["detail"]


@pytest.mark.django_db
@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_anonymous_other_tenant_and_tokens(row, world, client_for, make_token):  # noqa: F811
    assert call(client_for(None), row, world).status_code == 401
    assert call(client_for(world["outsider"]), row, world).status_code == 404
    acme = Tenant.objects.get(slug="acme")
    owner = world["members"]["owner"]
    missing = make_token(owner, acme, [s for s in ApiToken.Scope.values if s != row.scope], name="without")
    response = call(client_for(token=missing), row, world)
    assert response.status_code == 403 and f"'{row.scope}' scope" in response.json()["detail"]
    foreign = make_token(world["outsider"], Tenant.objects.get(slug="globex"), ApiToken.Scope.values, name="x")
    assert call(client_for(token=foreign), row, world).status_code == 404
    scoped = make_token(owner, acme, [row.scope], name="with")
    assert call(client_for(token=scoped), row, world).status_code == row.expected["owner"]
