"""Functions through the API: create, configure, source files, deploy and traffic, environment,
secrets, grants, invocations, and the effects each leaves (audit rows, engine calls)."""

from datetime import timedelta

import pytest
from django.utils import timezone

from functions.models import Function, Invocation, Revision, Secret
from tenancy.models import AuditEvent
from tests.api.conftest import SECRET_VALUE

FNS = "/api/v1/tenants/acme/functions/"
FN = FNS + "hello/"


# ---- create, read, configure, delete -------------------------------------------------------

def test_create_from_a_starter(client_for, members, tenant, settings):
    settings.NIMBUS_PUBLIC_URL = "https://nimbus.example.com"
    client = client_for(members["developer"])
    response = client.post(FNS, {"name": "api", "starter": "http-json", "description": "JSON echo"}, format="json")
    assert response.status_code == 201
    body = response.json()
    assert body["invoke_url"] == "https://nimbus.example.com/fn/acme/api/"
    assert body["state"] == "draft"
    assert body["source_version"] == 1
    assert body["created_by"] == "acme-developer"
    assert body["permissions"] == ["view", "change", "deploy"]
    assert body["traffic"] == []
    from functions.starters import starter_files

    files = client.get(FNS + "api/files/").json()
    assert {f["path"] for f in files["files"]} == set(starter_files("python3.11", "http-json"))
    assert AuditEvent.objects.filter(action="function.create", actor=members["developer"]).count() == 1


def test_create_from_files_and_for_node(client_for, members, tenant):
    client = client_for(members["developer"])
    response = client.post(FNS, {"name": "raw", "files": {"handler.py": "def handle(e, c):\n    return 'raw'\n"}},
                           format="json")
    assert response.status_code == 201
    assert [f["path"] for f in client.get(FNS + "raw/files/").json()["files"]] == ["handler.py"]
    node = client.post(FNS, {"name": "js", "runtime": "node20"}, format="json")
    assert node.status_code == 201
    assert node.json()["runtime"] == "node20"
    missing = client.post(FNS, {"name": "js-cron", "runtime": "node20", "starter": "cron"}, format="json")
    assert missing.status_code == 400
    assert missing.json()["field"] == "starter"
    assert "no 'cron' starter for node20" in missing.json()["detail"]


@pytest.mark.parametrize("role,permissions", [
    ("viewer", ["view"]),
    ("developer", ["view", "change", "deploy"]),
    ("admin", ["view", "change", "deploy", "delete", "share"]),
    ("owner", ["view", "change", "deploy", "delete", "share"]),
])
def test_detail_lists_the_callers_permissions(role, permissions, client_for, members, function):
    body = client_for(members[role]).get(FN).json()
    assert body["permissions"] == permissions
    assert body["memory_mb"] == 256
    assert body["handler"] == "handler.handle"


def test_list_search_filter_order(client_for, members, tenant, function):
    from functions.services import function_create, function_take_offline

    dev = members["developer"]
    function_create(acting_user=dev, tenant=tenant, name="billing", description="Invoices as PDF")
    offline = function_create(acting_user=dev, tenant=tenant, name="cleanup", runtime="node20")
    function_take_offline(acting_user=dev, function=offline)
    client = client_for(members["viewer"])

    def names(**params):
        return [f["name"] for f in client.get(FNS, params).json()["results"]]

    assert names() == ["billing", "cleanup", "hello"]
    assert names(search="invoice") == ["billing"]
    assert names(state="offline") == ["cleanup"]
    assert names(runtime="python3.11") == ["billing", "hello"]
    assert names(ordering="-name") == ["hello", "cleanup", "billing"]
    page = client.get(FNS, {"page_size": 2}).json()
    assert page["count"] == 3
    assert [f["name"] for f in page["results"]] == ["billing", "cleanup"]
    assert client.get(FNS, {"page_size": 2, "page": 2}).json()["results"][0]["name"] == "hello"
    assert client.get(FNS, {"state": "sleeping"}).status_code == 400
    assert all(f["permissions"] == ["view"] for f in client.get(FNS).json()["results"])


def test_patch_config_changes_settings_and_audits(client_for, members, function):
    response = client_for(members["developer"]).patch(FN, {"memory_mb": 512, "description": "Greets"},
                                                      format="json")
    assert response.status_code == 200
    assert (response.json()["memory_mb"], response.json()["description"]) == (512, "Greets")
    event = AuditEvent.objects.get(action="function.update")
    assert event.details == {"memory_mb": [256, 512], "description": ["", "Greets"]}
    assert event.actor == members["developer"]


def test_patch_config_model_validation(client_for, members, function):
    response = client_for(members["developer"]).patch(FN, {"min_instances": 4, "max_instances": 2}, format="json")
    assert response.status_code == 400
    assert response.json()["field"] == "min_instances"
    assert "cannot exceed max instances" in response.json()["detail"]
    function.refresh_from_db()
    assert (function.min_instances, function.max_instances) == (0, 5)


def test_delete_function_tells_the_engine_after_commit(client_for, members, deployed, engine,
                                                       django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        response = client_for(members["admin"]).delete(FN)
    assert response.status_code == 204
    assert not Function.objects.filter(name="hello").exists()
    assert engine.named("delete") == [("delete", "hello")]
    assert client_for(members["admin"]).get(FN).status_code == 404


# ---- source files ----------------------------------------------------------------------------

def test_file_round_trip(client_for, members, function):
    client = client_for(members["developer"])
    tree = client.get(FN + "files/").json()
    assert tree["version"] == 1
    saved = client.put(FN + "files/lib/greek.py", {"content": "WORD = 'λόγος'\n", "base_version": 1},
                       format="json")
    assert saved.json() == {"path": "lib/greek.py", "version": 2}
    sizes = {f["path"]: f["size"] for f in client.get(FN + "files/").json()["files"]}
    assert sizes["lib/greek.py"] == len("WORD = 'λόγος'\n".encode())
    got = client.get(FN + "files/lib/greek.py").json()
    assert got == {"path": "lib/greek.py", "size": sizes["lib/greek.py"], "content": "WORD = 'λόγος'\n",
                   "version": 2}
    renamed = client.post(FN + "files/lib/greek.py", {"new_path": "greek.py", "base_version": 2}, format="json")
    assert renamed.json() == {"path": "greek.py", "version": 3}
    assert client.get(FN + "files/lib/greek.py").status_code == 404
    deleted = client.delete(FN + "files/greek.py?base_version=3")
    assert deleted.json() == {"path": "greek.py", "version": 4}
    assert [f["path"] for f in client.get(FN + "files/").json()["files"]] == ["handler.py"]
    actions = list(AuditEvent.objects.filter(action__startswith="source.").order_by("id")
                   .values_list("action", flat=True))
    assert actions == ["source.save", "source.rename_file", "source.delete_file"]


def test_replace_whole_draft(client_for, members, function):
    client = client_for(members["developer"])
    files = {"handler.py": "from util import x\n\ndef handle(e, c):\n    return x\n", "util.py": "x = 42\n"}
    response = client.put(FN + "files/", {"files": files, "base_version": 1}, format="json")
    assert response.status_code == 200
    assert response.json() == {"version": 2, "files": [{"path": "handler.py", "size": len(files["handler.py"])},
                                                       {"path": "util.py", "size": 7}]}


def test_file_limits_are_clear(client_for, members, function, settings):
    settings.NIMBUS_MAX_FILE_BYTES = 1000  # the starter's handler.py is smaller
    response = client_for(members["developer"]).put(FN + "files/big.txt", {"content": "x" * 1001, "base_version": 1},
                                                    format="json")
    assert response.status_code == 400
    assert response.json()["code"] == "invalid_source"
    assert response.json()["detail"] == "'big.txt' is 1,001 bytes; a file may be at most 1,000 bytes."


def test_rename_onto_an_existing_file_is_409(client_for, members, function):
    client = client_for(members["developer"])
    client.put(FN + "files/a.py", {"content": "", "base_version": 1}, format="json")
    response = client.post(FN + "files/a.py", {"new_path": "handler.py", "base_version": 2}, format="json")
    assert response.status_code == 409
    assert response.json()["field"] == "new_path"


# ---- deploy, revisions, traffic --------------------------------------------------------------

def deploy(client, django_capture_on_commit_callbacks, **body):
    with django_capture_on_commit_callbacks(execute=True):
        return client.post(FN + "deploy", body, format="json")


def test_deploy_returns_202_and_rolls_out_after_commit(client_for, members, function, engine,
                                                       django_capture_on_commit_callbacks):
    client = client_for(members["developer"])
    response = deploy(client, django_capture_on_commit_callbacks, message="first deploy")
    assert response.status_code == 202
    body = response.json()
    assert (body["number"], body["status"], body["message"], body["author"]) == (1, "pending", "first deploy",
                                                                                "acme-developer")
    assert engine.named("deploy") == [("deploy", "hello", 1, [(1, 100, "")])]
    revision = client.get(FN + "revisions/1/").json()
    assert revision["status"] == "ready"
    assert "def handle" in revision["files"]["handler.py"]
    detail = client.get(FN).json()
    assert detail["state"] == "deployed"
    assert detail["traffic"] == [{"revision": 1, "percent": 100, "tag": ""}]
    assert AuditEvent.objects.filter(action="function.deploy", details__revision=1).exists()


def test_deploy_of_broken_source_is_refused_with_markers(client_for, members, function, engine):
    client = client_for(members["developer"])
    client.put(FN + "files/handler.py", {"content": "def handle(e, c)\n    return 1\n", "base_version": 1},
               format="json")
    response = client.post(FN + "deploy", {}, format="json")
    assert response.status_code == 400
    body = response.json()
    assert body["code"] == "invalid_source"
    assert body["detail"].startswith("handler.py, line 1:")
    assert body["markers"][0]["path"] == "handler.py"
    assert not Revision.objects.exists()
    assert engine.calls == []


def test_failed_engine_deploy_is_recorded_on_the_revision(client_for, members, deployed, engine,
                                                          django_capture_on_commit_callbacks):
    engine.fail_deploy = "image pull failed"
    client = client_for(members["developer"])
    assert deploy(client, django_capture_on_commit_callbacks).status_code == 202
    revision = client.get(FN + "revisions/2/").json()
    assert (revision["status"], revision["status_message"]) == ("failed", "image pull failed")
    # The old revision keeps serving.
    assert client.get(FN + "traffic").json() == [{"revision": 1, "percent": 100, "tag": ""}]
    failed = client.get(FN + "revisions/", {"status": "failed"}).json()
    assert [r["number"] for r in failed["results"]] == [2]


def test_canary_traffic_and_rollback(client_for, members, deployed, engine, django_capture_on_commit_callbacks):
    client = client_for(members["developer"])
    assert deploy(client, django_capture_on_commit_callbacks, promote=False, message="canary").status_code == 202
    assert client.get(FN + "traffic").json() == [{"revision": 1, "percent": 100, "tag": ""}]
    assert [r["number"] for r in client.get(FN + "revisions/").json()["results"]] == [2, 1]

    split = [{"revision": 1, "percent": 90}, {"revision": 2, "percent": 10, "tag": "canary"}]
    with django_capture_on_commit_callbacks(execute=True):
        response = client.put(FN + "traffic", split, format="json")
    assert response.status_code == 200
    assert response.json() == [{"revision": 1, "percent": 90, "tag": ""}, {"revision": 2, "percent": 10,
                                                                           "tag": "canary"}]
    assert engine.named("set_traffic")[-1] == ("set_traffic", "hello", [(1, 90, ""), (2, 10, "canary")])

    with django_capture_on_commit_callbacks(execute=True):
        rolled = client.post(FN + "rollback", {"revision": 1}, format="json")
    assert rolled.status_code == 200
    assert rolled.json()["traffic"] == [{"revision": 1, "percent": 100, "tag": ""},
                                        {"revision": 2, "percent": 0, "tag": "canary"}]
    assert engine.named("set_traffic")[-1] == ("set_traffic", "hello", [(1, 100, ""), (2, 0, "canary")])
    assert AuditEvent.objects.filter(action="revision.rollback").count() == 1


def test_rollback_and_traffic_refusals(client_for, members, deployed, engine):
    client = client_for(members["developer"])
    assert client.post(FN + "rollback", {"revision": 9}, format="json").status_code == 404
    Revision.objects.create(function=deployed, number=2, content_hash="x", files={}, config={},
                            status=Revision.Status.FAILED)
    conflict = client.post(FN + "rollback", {"revision": 2}, format="json")
    assert conflict.status_code == 409
    assert conflict.json()["detail"] == "Revision 2 is failed; only a ready revision can take traffic."
    not_ready = client.put(FN + "traffic", [{"revision": 1, "percent": 50}, {"revision": 2, "percent": 50}],
                           format="json")
    assert not_ready.status_code == 400
    assert not_ready.json()["detail"] == "Revision(s) 2 are not deployed and ready."
    assert client.put(FN + "traffic", {"revision": 1}, format="json").status_code == 400


def test_offline_and_online(client_for, members, deployed, engine, django_capture_on_commit_callbacks):
    client = client_for(members["developer"])
    with django_capture_on_commit_callbacks(execute=True):
        assert client.post(FN + "offline").json()["state"] == "offline"
    with django_capture_on_commit_callbacks(execute=True):
        assert client.post(FN + "online").json()["state"] == "deployed"
    assert engine.named("set_offline") == [("set_offline", "hello", True), ("set_offline", "hello", False)]


def test_deploy_needs_the_deploy_scope(client_for, members, function, tenant, make_token, engine):
    token = make_token(members["developer"], tenant, ["read", "write"])
    response = client_for(token=token).post(FN + "deploy", {}, format="json")
    assert response.status_code == 403
    assert response.json()["detail"] == "This API token lacks the 'deploy' scope (it has: read, write)."
    assert not Revision.objects.exists()


# ---- environment, secrets, grants ------------------------------------------------------------

def test_environment_variables(client_for, members, function):
    client = client_for(members["developer"])
    assert client.put(FN + "env/", {"name": "COLOR", "value": "blue"}, format="json").json() == {
        "name": "COLOR", "value": "blue"}
    assert client.put(FN + "env/", {"name": "COLOR", "value": "red"}, format="json").status_code == 200
    assert client_for(members["viewer"]).get(FN + "env/").json() == [{"name": "COLOR", "value": "red"}]
    reserved = client.put(FN + "env/", {"name": "PORT", "value": "1"}, format="json")
    assert reserved.status_code == 400
    assert reserved.json()["detail"] == "'PORT' is reserved by the platform."
    assert client.delete(FN + "env/COLOR/").status_code == 204
    missing = client.delete(FN + "env/COLOR/")
    assert missing.status_code == 404
    assert missing.json()["detail"] == "There is no variable 'COLOR'."


def test_secret_values_never_leave_the_server(client_for, members, world, engine, django_capture_on_commit_callbacks):
    client = client_for(members["owner"])
    stored = client.put(FN + "secrets/", {"name": "DB_PASSWORD", "value": SECRET_VALUE + "-db"}, format="json")
    assert set(stored.json()) == {"name", "updated_at"}
    with django_capture_on_commit_callbacks(execute=True):
        assert client.post(FN + "deploy", {}, format="json").status_code == 202
    ciphertexts = list(Secret.objects.values_list("ciphertext", flat=True))
    urls = [FNS, FN, FN + "files/", FN + "revisions/", FN + "revisions/1/", FN + "revisions/2/", FN + "traffic",
            FN + "env/", FN + "secrets/", FN + "grants/", FN + "invocations/", "/api/v1/tenants/acme/audit-events/",
            "/api/v1/tenants/acme/", "/api/v1/tenants/acme/tokens/"]
    for url in urls:
        response = client.get(url)
        assert response.status_code == 200, url
        text = response.content.decode()
        assert SECRET_VALUE not in text, url
        assert all(ct not in text for ct in ciphertexts), url
    assert client.get(FN + "secrets/").json()[0]["name"] == "API_KEY"
    revision = client.get(FN + "revisions/2/").json()
    assert revision["config"]["secrets"] == ["API_KEY", "DB_PASSWORD"]
    assert revision["config"]["env"] == {"GREETING": "hi"}


def test_secret_refusals(client_for, members, world):
    client = client_for(members["developer"])
    clash = client.put(FN + "secrets/", {"name": "GREETING", "value": "x"}, format="json")
    assert clash.status_code == 409
    assert clash.json()["detail"] == "'GREETING' is already a plain variable of this function."
    empty = client.put(FN + "secrets/", {"name": "EMPTY", "value": ""}, format="json")
    assert empty.status_code == 400
    assert empty.json()["field"] == "value"
    assert client.delete(FN + "secrets/NOPE/").status_code == 404


def test_grants_share_one_function_with_one_user(client_for, members, world):
    friend_client = client_for(world.friend)
    assert friend_client.get(FN).status_code == 200
    assert friend_client.patch(FN, {"description": "x"}, format="json").status_code == 403
    owner = client_for(members["owner"])
    assert owner.get(FN + "grants/").json() == [{"username": "friend", "level": "view",
                                                 "permissions": ["view_function"]}]
    upgraded = owner.put(FN + "grants/", {"username": "friend", "level": "edit"}, format="json")
    assert upgraded.json() == {"username": "friend", "level": "edit",
                               "permissions": ["change_function", "view_function"]}
    assert friend_client.patch(FN, {"description": "by friend"}, format="json").status_code == 200
    assert friend_client.post(FN + "deploy", {}, format="json").status_code == 403
    # A grant opens the function, not the tenant.
    assert friend_client.get("/api/v1/tenants/acme/").status_code == 404
    assert owner.delete(FN + "grants/friend/").status_code == 204
    assert friend_client.get(FN).status_code == 404
    assert owner.delete(FN + "grants/friend/").status_code == 404
    unknown = owner.put(FN + "grants/", {"username": "ghost", "level": "view"}, format="json")
    assert unknown.status_code == 400
    assert unknown.json()["field"] == "username"
    assert list(AuditEvent.objects.filter(action__in=["function.share", "function.unshare"]).order_by("id")
                .values_list("action", flat=True)) == ["function.share", "function.share", "function.unshare"]


# ---- invocations -----------------------------------------------------------------------------

def test_invocations_newest_first_with_filters(client_for, members, deployed, tenant):
    from functions.services import function_create

    revision = Revision.objects.get(function=deployed, number=1)
    now = timezone.now()
    for minutes, status in [(3, "success"), (2, "error"), (1, "success")]:
        Invocation.objects.create(function=deployed, revision=revision, started_at=now - timedelta(minutes=minutes),
                                  status=status, http_status=200 if status == "success" else 500, duration_ms=minutes)
    other = function_create(acting_user=members["developer"], tenant=tenant, name="other")
    Invocation.objects.create(function=other, started_at=now, status="success")
    client = client_for(members["viewer"])
    body = client.get(FN + "invocations/").json()
    assert [i["duration_ms"] for i in body["results"]] == [1, 2, 3]
    assert body["results"][0]["revision"] == 1
    assert [i["status"] for i in client.get(FN + "invocations/", {"status": "error"}).json()["results"]] == ["error"]
    assert client.get(FN + "invocations/", {"revision": 2}).json()["count"] == 0
    assert client.get(FN + "invocations/", {"revision": 1}).json()["count"] == 3
    assert client.get(FN + "invocations/", {"status": "weird"}).status_code == 400
    assert client.post(FN + "invocations/", {}, format="json").status_code == 405


def test_invocation_detail_with_logs(client_for, members, deployed, tenant):
    from functions.models import InvocationLog
    from functions.services import function_create

    now = timezone.now()
    invocation = Invocation.objects.create(function=deployed, revision=deployed.revisions.get(number=1),
                                           started_at=now, status="error", http_status=500, error="ZeroDivisionError")
    for offset, message in enumerate(["start", "dividing"]):
        InvocationLog.objects.create(invocation=invocation, time=now + timedelta(milliseconds=offset),
                                     message=message)
    client = client_for(members["viewer"])
    body = client.get(FN + f"invocations/{invocation.pk}/").json()
    assert (body["status"], body["error"], body["revision"]) == ("error", "ZeroDivisionError", 1)
    assert [line["message"] for line in body["logs"]] == ["start", "dividing"]
    # Another function's invocation is not reachable under this one.
    other = function_create(acting_user=members["developer"], tenant=tenant, name="other")
    foreign = Invocation.objects.create(function=other, started_at=now, status="success")
    assert client.get(FN + f"invocations/{foreign.pk}/").status_code == 404
    assert client.get(FN + "invocations/not-a-uuid/").json()["code"] == "not_found"
