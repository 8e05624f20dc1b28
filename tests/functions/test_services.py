import pytest
from django.contrib.auth import get_user_model

from functions import crypto
from functions.models import Function, Revision, Secret, SourceFile, TrafficTarget
from functions.selectors import function_for_user, functions_for_user, user_can_function
from functions.services import (
    function_bring_online,
    function_create,
    function_delete,
    function_deploy,
    function_env_set,
    function_file_delete,
    function_file_rename,
    function_file_save,
    function_secret_set,
    function_share,
    function_source_replace,
    function_take_offline,
    function_traffic_set,
    function_unshare,
    function_update,
    revision_rollback,
    validate_path,
)
from portal.errors import Conflict, InvalidSource, NotFound, PermissionDenied, QuotaExceeded, StaleVersion, ValidationFailed
from tenancy.models import AuditEvent
from tests.conftest import make_user

pytestmark = pytest.mark.django_db

ROLE_ACTIONS = {
    "owner": {"view", "change", "deploy", "delete", "share"},
    "admin": {"view", "change", "deploy", "delete", "share"},
    "developer": {"view", "change", "deploy"},
    "viewer": {"view"},
}


@pytest.mark.parametrize("role", ROLE_ACTIONS)
def test_role_actions_on_function(function, members, role):
    user = members[role]
    allowed = {a for a in ("view", "change", "deploy", "delete", "share") if user_can_function(user, function, a)}
    assert allowed == ROLE_ACTIONS[role]


def test_outsider_cannot_see_function(function, outsider):
    with pytest.raises(NotFound):
        function_for_user(outsider, "acme", "hello")
    assert not functions_for_user(outsider).exists()


def test_viewer_cannot_create(tenant, members):
    with pytest.raises(PermissionDenied):
        function_create(acting_user=members["viewer"], tenant=tenant, name="nope")


def test_create_from_starter_with_audit(function, members):
    assert set(SourceFile.objects.filter(function=function).values_list("path", flat=True)) == {"handler.py"}
    assert function.source_version == 1 and function.state == "draft"
    assert AuditEvent.objects.filter(action="function.create", target_id=str(function.pk),
                                     actor=members["developer"]).exists()


@pytest.mark.parametrize("name", ["Hello", "1fn", "fn_1", "fn-", "a" * 41, "-x", ""])
def test_function_name_must_be_dns_label(tenant, members, name):
    with pytest.raises(ValidationFailed) as err:
        function_create(acting_user=members["developer"], tenant=tenant, name=name)
    assert err.value.field == "name"
    assert not Function.objects.exists()


def test_duplicate_name_conflicts(function, tenant, members):
    with pytest.raises(Conflict):
        function_create(acting_user=members["developer"], tenant=tenant, name="hello")


def test_quota_on_count_and_memory(tenant, members):
    tenant.quota.max_functions = 1
    tenant.quota.save()
    function_create(acting_user=members["developer"], tenant=tenant, name="one")
    with pytest.raises(QuotaExceeded):
        function_create(acting_user=members["developer"], tenant=tenant, name="two")
    with pytest.raises(QuotaExceeded) as err:
        function_update(acting_user=members["developer"], function=Function.objects.get(name="one"), memory_mb=4096)
    assert err.value.field == "memory_mb"


@pytest.mark.parametrize("path", ["../etc/passwd", "/abs.py", "a/../b.py", "a\\b.py", ".hidden", "a//b", "x" * 300,
                                  "a/b/c/d/e/f/g/h/i.py", "sp ace.py"])
def test_path_traversal_and_bad_names_refused(path):
    with pytest.raises(InvalidSource):
        validate_path(path)


def test_save_rename_delete_bump_version_and_refuse_stale(function, members):
    dev = members["developer"]
    v = function_file_save(acting_user=dev, function=function, path="lib/util.py", content="X = 1\n", base_version=1)
    v = function_file_rename(acting_user=dev, function=function, path="lib/util.py", new_path="lib/tools.py",
                             base_version=v)
    v = function_file_delete(acting_user=dev, function=function, path="lib/tools.py", base_version=v)
    assert v == 4
    with pytest.raises(StaleVersion) as err:
        function_file_save(acting_user=dev, function=function, path="handler.py", content="", base_version=3)
    assert err.value.details["current_version"] == 4
    assert SourceFile.objects.get(function=function, path="handler.py").content.startswith("def handle")


def test_oversized_file_refused_and_nothing_lost(function, members, settings):
    settings.NIMBUS_MAX_FILE_BYTES = 100
    with pytest.raises(InvalidSource):
        function_file_save(acting_user=members["developer"], function=function, path="big.txt", content="x" * 101,
                           base_version=1)
    function.refresh_from_db()
    assert function.source_version == 1
    assert not SourceFile.objects.filter(path="big.txt").exists()


def test_replace_whole_source(function, members):
    v = function_source_replace(acting_user=members["developer"], function=function,
                                files={"handler.py": "def handle(e, c):\n    return 'x'\n", "README.md": "hi"},
                                base_version=1)
    assert v == 2
    assert SourceFile.objects.filter(function=function).count() == 2


def test_viewer_cannot_save(function, members):
    with pytest.raises(PermissionDenied):
        function_file_save(acting_user=members["viewer"], function=function, path="handler.py", content="",
                           base_version=1)


def test_secret_encrypted_at_rest_and_not_audited(function, members):
    function_secret_set(acting_user=members["developer"], function=function, name="API_KEY", value="s3cret-value")
    stored = Secret.objects.get(function=function, name="API_KEY")
    assert "s3cret-value" not in stored.ciphertext
    assert crypto.decrypt(stored.ciphertext) == "s3cret-value"
    assert not AuditEvent.objects.filter(details__icontains="s3cret-value").exists()


@pytest.mark.parametrize("name", ["PORT", "NIMBUS_X", "K_SERVICE", "1A", "A-B"])
def test_reserved_or_invalid_env_names(function, members, name):
    with pytest.raises(ValidationFailed):
        function_env_set(acting_user=members["developer"], function=function, name=name, value="v")


def test_deploy_freezes_revision_and_routes_traffic(function, members, engine, django_capture_on_commit_callbacks):
    function_env_set(acting_user=members["developer"], function=function, name="GREETING", value="hi")
    function_secret_set(acting_user=members["developer"], function=function, name="TOKEN", value="tok")
    with django_capture_on_commit_callbacks(execute=True):
        revision = function_deploy(acting_user=members["developer"], function=function, message="first")
    revision.refresh_from_db()
    assert revision.number == 1 and revision.status == "ready"
    (spec, traffic), = engine.specs
    assert spec.env == {"GREETING": "hi"} and spec.secrets == {"TOKEN": "tok"}
    assert "tok" not in repr(spec)
    assert [(t.revision, t.percent) for t in traffic] == [(1, 100)]
    assert list(TrafficTarget.objects.values_list("revision__number", "percent")) == [(1, 100)]
    function.refresh_from_db()
    assert function.state == "deployed"
    # The revision is immutable even if the draft changes afterwards.
    function_file_save(acting_user=members["developer"], function=function, path="handler.py", content="x=1\n",
                       base_version=1)
    revision.refresh_from_db()
    assert revision.files["handler.py"].startswith("def handle")
    revision.files = {"handler.py": "changed"}
    with pytest.raises(ValueError):
        revision.save()


def test_failed_deploy_keeps_previous_traffic(function, members, engine, django_capture_on_commit_callbacks):
    dev = members["developer"]
    with django_capture_on_commit_callbacks(execute=True):
        function_deploy(acting_user=dev, function=function)
    engine.fail_deploy = "instance did not become healthy"
    with django_capture_on_commit_callbacks(execute=True):
        second = function_deploy(acting_user=dev, function=function)
    second.refresh_from_db()
    assert second.status == "failed" and "healthy" in second.status_message
    assert list(TrafficTarget.objects.values_list("revision__number", "percent")) == [(1, 100)]


def test_syntax_error_refuses_deploy_with_position(function, members, engine):
    function_file_save(acting_user=members["developer"], function=function, path="handler.py",
                       content="def handle(event, context):\n    return (\n", base_version=1)
    with pytest.raises(InvalidSource) as err:
        function_deploy(acting_user=members["developer"], function=function)
    assert err.value.details["markers"][0]["path"] == "handler.py"
    assert not Revision.objects.exists()


def test_viewer_cannot_deploy(function, members, engine):
    with pytest.raises(PermissionDenied):
        function_deploy(acting_user=members["viewer"], function=function)


def test_traffic_split_and_rollback(function, members, engine, django_capture_on_commit_callbacks):
    dev = members["developer"]
    for _ in range(2):
        with django_capture_on_commit_callbacks(execute=True):
            function_deploy(acting_user=dev, function=function)
    with django_capture_on_commit_callbacks(execute=True):
        function_traffic_set(acting_user=dev, function=function,
                             targets=[{"revision": 1, "percent": 90}, {"revision": 2, "percent": 10, "tag": "canary"}])
    assert sorted(TrafficTarget.objects.values_list("revision__number", "percent", "tag")) == [
        (1, 90, ""), (2, 10, "canary")]
    assert engine.named("set_traffic")[-1][2][1] == (2, 10, "canary")
    with pytest.raises(ValidationFailed):
        function_traffic_set(acting_user=dev, function=function, targets=[{"revision": 1, "percent": 50}])
    with pytest.raises(ValidationFailed):
        function_traffic_set(acting_user=dev, function=function, targets=[{"revision": 9, "percent": 100}])
    with django_capture_on_commit_callbacks(execute=True):
        revision_rollback(acting_user=dev, function=function, number=2)
    assert sorted(TrafficTarget.objects.values_list("revision__number", "percent", "tag")) == [(2, 100, "")]
    assert AuditEvent.objects.filter(action="revision.rollback").exists()


def test_offline_online_and_delete(function, members, engine, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        function_take_offline(acting_user=members["developer"], function=function)
    assert engine.named("set_offline")[-1][2] is True
    with django_capture_on_commit_callbacks(execute=True):
        function_bring_online(acting_user=members["developer"], function=function)
    assert Function.objects.get(pk=function.pk).state == "draft"
    with pytest.raises(PermissionDenied):
        function_delete(acting_user=members["developer"], function=function)
    with django_capture_on_commit_callbacks(execute=True):
        function_delete(acting_user=members["admin"], function=function)
    assert not Function.objects.exists()
    assert engine.named("delete")


def test_share_with_a_user_outside_the_tenant(function, members):
    guest = make_user("guest")
    function_share(acting_user=members["admin"], function=function, username="guest", level="edit")
    guest = get_user_model().objects.get(pk=guest.pk)
    assert function_for_user(guest, "acme", "hello") == function
    assert user_can_function(guest, function, "change")
    assert not user_can_function(guest, function, "deploy")
    with pytest.raises(PermissionDenied):
        function_share(acting_user=members["developer"], function=function, username="guest", level="deploy")
    function_unshare(acting_user=members["admin"], function=function, username="guest")
    guest = get_user_model().objects.get(pk=guest.pk)
    with pytest.raises(NotFound):
        function_for_user(guest, "acme", "hello")


def test_create_records_the_starter_in_the_audit(tenant, members):
    function_create(acting_user=members["developer"], tenant=tenant, name="api", starter="http-json")
    function_create(acting_user=members["developer"], tenant=tenant, name="raw", starter="hello",
                    files={"handler.py": "def handle(e, c):\n    return 1\n"})
    starters = dict(AuditEvent.objects.filter(action="function.create").values_list("target_repr", "details__starter"))
    assert starters == {"acme/api": "http-json", "acme/raw": None}
