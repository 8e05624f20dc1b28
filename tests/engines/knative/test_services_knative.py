"""The portal's services driving the Knative engine (API stand-in behind it): deploy, traffic,
offline, delete, as a user does them."""

import pytest

from functions import services
from functions.engines import set_engine
from functions.models import Revision, TrafficTarget
from functions.services import (
    function_bring_online,
    function_delete,
    function_deploy,
    function_secret_set,
    function_take_offline,
    function_traffic_set,
)

from .conftest import FakeKnative

pytestmark = pytest.mark.django_db


@pytest.fixture
def knative(engine, stand_in, monkeypatch, settings):
    settings.NIMBUS_ENGINE = "knative"
    published = []
    monkeypatch.setattr(services, "publish_function_event", lambda function_id, event: published.append(event))
    stand_in.controller = FakeKnative("ready")
    set_engine(engine)
    yield published
    set_engine(None)


def deploy(user, function, capture):
    with capture(execute=True):
        revision = function_deploy(acting_user=user, function=function)
    revision.refresh_from_db()
    return revision


def test_deploy_through_services(function, members, knative, stand_in, django_capture_on_commit_callbacks):
    dev = members["developer"]
    function_secret_set(acting_user=dev, function=function, name="API_KEY", value="k3y")
    revision = deploy(dev, function, django_capture_on_commit_callbacks)
    assert (revision.status, revision.status_message) == ("ready", "")
    namespace = stand_in.get("api/v1", "namespaces", None, "nimbus-acme")
    assert namespace["metadata"]["labels"]["nimbus.dev/tenant"] == "acme"
    quota = stand_in.get("api/v1", "resourcequotas", "nimbus-acme", "nimbus-quota")
    assert quota["spec"]["hard"]["count/services.serving.knative.dev"] == str(function.tenant.quota.max_functions)
    service = stand_in.service("nimbus-acme", "hello")
    template = service["spec"]["template"]
    assert template["metadata"]["name"] == "hello-00001"
    assert template["metadata"]["labels"]["nimbus.dev/function-id"] == str(function.pk)
    env = {e["name"]: e for e in template["spec"]["containers"][0]["env"]}
    assert env["API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "hello-00001-secrets", "key": "API_KEY"}
    code = stand_in.get("api/v1", "configmaps", "nimbus-acme", "hello-00001-code")["data"]
    assert set(code) == {i["key"] for i in template["spec"]["volumes"][0]["configMap"]["items"]}
    assert [(e["step"], e["status"]) for e in knative] == [
        ("frozen", "ok"), ("manifests", "ok"), ("instance", "running"), ("instance", "ok"), ("health", "ok"),
        ("traffic", "ok"), ("done", "ok")]


def test_failed_revision_is_recorded_with_knatives_message(function, members, knative, stand_in,
                                                           django_capture_on_commit_callbacks):
    dev = members["developer"]
    deploy(dev, function, django_capture_on_commit_callbacks)
    stand_in.controller = FakeKnative("failed", fail_message="Back-off pulling image")
    second = deploy(dev, function, django_capture_on_commit_callbacks)
    assert second.status == "failed"
    assert second.status_message == "Revision hello-00002 failed: Back-off pulling image"
    assert list(TrafficTarget.objects.values_list("revision__number", "percent")) == [(1, 100)]
    assert stand_in.service("nimbus-acme", "hello")["spec"]["traffic"] == [
        {"revisionName": "hello-00001", "latestRevision": False, "percent": 100}]


def test_traffic_offline_and_delete_through_services(function, members, knative, stand_in,
                                                     django_capture_on_commit_callbacks):
    dev = members["developer"]
    deploy(dev, function, django_capture_on_commit_callbacks)
    deploy(dev, function, django_capture_on_commit_callbacks)
    with django_capture_on_commit_callbacks(execute=True):
        function_traffic_set(acting_user=dev, function=function,
                             targets=[{"revision": 2, "percent": 75}, {"revision": 1, "percent": 25, "tag": "old"}])
    assert [(t["revisionName"], t["percent"], t.get("tag")) for t in stand_in.service("nimbus-acme", "hello")["spec"]
            ["traffic"]] == [("hello-00002", 75, None), ("hello-00001", 25, "old")]
    with django_capture_on_commit_callbacks(execute=True):
        function_take_offline(acting_user=dev, function=function)
    assert stand_in.service("nimbus-acme", "hello")["metadata"]["labels"]["networking.knative.dev/visibility"] == \
        "cluster-local"
    with django_capture_on_commit_callbacks(execute=True):
        function_bring_online(acting_user=dev, function=function)
    assert "networking.knative.dev/visibility" not in stand_in.service("nimbus-acme", "hello")["metadata"]["labels"]
    assert Revision.objects.filter(function=function, status="ready").count() == 2
    with django_capture_on_commit_callbacks(execute=True):
        function_delete(acting_user=members["owner"], function=function)
    assert stand_in.service("nimbus-acme", "hello") is None
    assert [k for k in stand_in.objects if k[1] in ("configmaps", "secrets")] == []
