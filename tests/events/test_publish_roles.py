"""Publishing events to a tenant takes a developer or above, by the token's user's role now: a viewer
cannot mint a publish token, and a publish token whose user was downgraded stops publishing."""

import json

import pytest
from django.test import Client

from portal.errors import ValidationFailed
from tenancy.models import Membership
from tenancy.services import tenant_member_change_role, token_create

pytestmark = pytest.mark.django_db

EVENT = {"specversion": "1.0", "type": "order.created", "source": "/shop", "id": "e-1", "data": {"n": 1}}


def publish(plaintext):
    return Client().post("/events/acme/", data=json.dumps(EVENT), content_type="application/cloudevents+json",
                         HTTP_AUTHORIZATION=f"Bearer {plaintext}")


def test_a_viewer_cannot_mint_a_publish_token(members, tenant):
    with pytest.raises(ValidationFailed) as refused:
        token_create(acting_user=members["viewer"], tenant=tenant, name="pub", scopes=["publish"])
    assert "publish" in refused.value.message


def test_a_developer_publishes_and_once_downgraded_does_not(members, tenant):
    # With "read" beside it: a token the downgrade leaves no scope at all is revoked (401), not refused.
    _, plaintext = token_create(acting_user=members["developer"], tenant=tenant, name="pub",
                                scopes=["publish", "read"])
    accepted = publish(plaintext)
    assert accepted.status_code == 202, accepted.content
    tenant_member_change_role(acting_user=members["owner"],
                              membership=Membership.objects.get(user=members["developer"], tenant=tenant),
                              role="viewer")
    refused = publish(plaintext)
    assert refused.status_code == 403
    assert refused.json()["code"] == "permission_denied" and "developers and above" in refused.json()["detail"]


def test_a_viewers_old_publish_token_is_refused(members, tenant):
    """A token made with publish while its user was a developer (the table did not exist then, or
    they were downgraded since): the viewer's role decides at use."""
    from tenancy.models import ApiToken

    _, plaintext = token_create(acting_user=members["viewer"], tenant=tenant, name="pub", scopes=["read"])
    ApiToken.objects.filter(prefix=plaintext.split("_")[1]).update(scopes=["publish", "read"])
    assert publish(plaintext).status_code == 403
