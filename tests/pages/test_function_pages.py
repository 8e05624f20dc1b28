"""The function page's tabs: overview and invoke line, configuration, files, revisions (deploy,
rollback, polling), traffic, environment and secrets, sharing, invocations, deletion."""

from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone

from functions.models import EnvVar, Function, Invocation, Revision, Secret, TrafficTarget
from functions.selectors import function_direct_grants
from functions.services import function_update
from tests.conftest import make_user


def url(view_name, **extra):
    return reverse(view_name, kwargs={"tenant": "acme", "function": "hello", **extra})


def serving(function):
    return sorted((t.revision.number, t.percent, t.tag) for t in TrafficTarget.objects.filter(function=function))


# ---- overview --------------------------------------------------------------------------------

@pytest.mark.django_db
def test_overview_shows_invoke_url_and_curl_line(function, members, client_for, settings):
    settings.NIMBUS_PUBLIC_URL = "https://nimbus.example.com"
    client = client_for(members["viewer"])
    page = client.get(url("function_detail"))
    assert page.context["invoke_url"] == "https://nimbus.example.com/fn/acme/hello/"
    assert b"https://nimbus.example.com/fn/acme/hello/" in page.content
    assert b"Authorization" not in page.content
    assert b'data-copy-target="curl-line"' in page.content
    # Viewers get no buttons they cannot use.
    assert b"Open in IDE" not in page.content and b"Take offline" not in page.content

    function_update(acting_user=members["developer"], function=function, invoke_auth="token")
    page = client.get(url("function_detail"))
    assert 'Authorization: Bearer $NIMBUS_TOKEN' in page.context["curl"]
    assert b"Authorization: Bearer $NIMBUS_TOKEN" in page.content


@pytest.mark.django_db
def test_developer_sees_ide_link_and_can_take_offline(deployed, members, client_for, engine,
                                                       django_capture_on_commit_callbacks):
    client = client_for(members["developer"])
    page = client.get(url("function_detail"))
    assert b'href="/ide/acme/hello/"' in page.content
    confirm = client.get(url("function_state"))
    assert b"Take hello offline?" in confirm.content
    deployed.refresh_from_db()
    assert deployed.state == Function.State.DEPLOYED
    with django_capture_on_commit_callbacks(execute=True):
        client.post(url("function_state"))
    deployed.refresh_from_db()
    assert deployed.state == Function.State.OFFLINE
    with django_capture_on_commit_callbacks(execute=True):
        client.post(url("function_state"), {"online": "1"})
    deployed.refresh_from_db()
    assert deployed.state == Function.State.DEPLOYED
    viewer = client_for(members["viewer"])
    assert viewer.post(url("function_state")).status_code == 403
    assert viewer.get(url("function_state")).status_code == 403
    assert engine.named("set_offline")[-2:] == [("set_offline", "hello", True), ("set_offline", "hello", False)]


# ---- configuration ---------------------------------------------------------------------------

def config_data(function, **changes):
    from functions.services import CONFIG_FIELDS

    data = {field: getattr(function, field) for field in CONFIG_FIELDS}
    data.update(changes)
    return {k: ("on" if v is True else v) for k, v in data.items() if v is not False}


@pytest.mark.django_db
def test_config_form_saves_and_shows_quota_errors_on_the_field(function, members, client_for):
    client = client_for(members["developer"])
    response = client.post(url("function_config"), config_data(function, memory_mb=512, description="Greets"))
    assert response.status_code == 302
    function.refresh_from_db()
    assert (function.memory_mb, function.description) == (512, "Greets")

    refused = client.post(url("function_config"), config_data(function, memory_mb=4096))
    assert refused.status_code == 200
    assert "exceeds the tenant's limit" in " ".join(refused.context["form"].errors["memory_mb"])
    function.refresh_from_db()
    assert function.memory_mb == 512

    invalid = client.post(url("function_config"), config_data(function, min_instances=5, max_instances=2))
    assert "min_instances" in invalid.context["form"].errors


@pytest.mark.django_db
def test_config_is_read_only_for_viewer(function, members, client_for):
    client = client_for(members["viewer"])
    page = client.get(url("function_config"))
    assert b"<fieldset class=\"card-body\" disabled>" in page.content
    assert b"Save configuration" not in page.content
    assert client.post(url("function_config"), config_data(function, memory_mb=128)).status_code == 403
    function.refresh_from_db()
    assert function.memory_mb == 256


# ---- files -----------------------------------------------------------------------------------

@pytest.mark.django_db
def test_files_list_and_read_only_view(function, members, client_for):
    client = client_for(members["viewer"])
    listing = client.get(url("function_files"))
    assert b"handler.py" in listing.content
    page = client.get(url("function_file", path="handler.py"))
    assert b"def handle" in page.content
    assert b"<textarea" not in page.content and b"Edit in the IDE" not in page.content
    developer_page = client_for(members["developer"]).get(url("function_file", path="handler.py"))
    assert b'href="/ide/acme/hello/"' in developer_page.content


# ---- revisions -------------------------------------------------------------------------------

@pytest.mark.django_db
def test_deploy_creates_a_revision_and_the_table_polls_while_it_is_pending(function, members, client_for):
    client = client_for(members["developer"])
    response = client.post(url("function_deploy"), {"message": "first deploy", "promote": "on"})
    assert response.status_code == 302
    revision = Revision.objects.get(function=function)
    assert (revision.number, revision.message, revision.status) == (1, "first deploy", "pending")

    table = client.get(url("function_revisions_table"))
    assert b'hx-trigger="every 2s"' in table.content
    assert b"first deploy" in table.content
    Revision.objects.filter(pk=revision.pk).update(status=Revision.Status.READY)
    settled = client.get(url("function_revisions_table"))
    assert b"hx-trigger" not in settled.content


@pytest.mark.django_db
def test_deploy_refused_for_a_broken_draft_and_for_a_viewer(function, members, client_for):
    from functions.services import function_file_save

    function_file_save(acting_user=members["developer"], function=function, path="handler.py",
                       content="def handle(event, context:\n", base_version=function.source_version)
    refused = client_for(members["developer"]).post(url("function_deploy"), {"message": "broken"})
    assert refused.status_code == 400
    assert "handler.py, line 1" in refused.content.decode()
    assert not Revision.objects.filter(function=function).exists()
    assert client_for(members["viewer"]).post(url("function_deploy"), {"message": "x"}).status_code == 403


@pytest.mark.django_db
def test_rollback_asks_first_then_moves_traffic(deployed, members, client_for, engine):
    assert serving(deployed) == [(2, 100, "")]
    client = client_for(members["developer"])
    confirm = client.get(url("revision_rollback", number=1))
    assert confirm.status_code == 200 and b"Roll back hello to revision 1?" in confirm.content
    assert serving(deployed) == [(2, 100, "")]
    assert client.post(url("revision_rollback", number=1)).status_code == 302
    assert serving(deployed) == [(1, 100, "")]


@pytest.mark.django_db
def test_rollback_to_a_failed_revision_is_refused(deployed, members, client_for):
    Revision.objects.filter(function=deployed, number=1).update(status=Revision.Status.FAILED)
    response = client_for(members["developer"]).post(url("revision_rollback", number=1), follow=True)
    assert "only a ready revision can take traffic" in response.content.decode()
    assert serving(deployed) == [(2, 100, "")]


@pytest.mark.django_db
def test_viewer_sees_revisions_without_buttons(deployed, members, client_for):
    page = client_for(members["viewer"]).get(url("function_revisions"))
    assert b"second" in page.content
    assert b"Deploy draft" not in page.content and b"Roll back" not in page.content


# ---- traffic ---------------------------------------------------------------------------------

@pytest.mark.django_db
def test_traffic_split_and_refusal(deployed, members, client_for, engine):
    client = client_for(members["developer"])
    response = client.post(url("function_traffic"), {"percent-1": "10", "tag-1": "canary", "percent-2": "90"})
    assert response.status_code == 302
    assert serving(deployed) == [(1, 10, "canary"), (2, 90, "")]

    refused = client.post(url("function_traffic"), {"percent-1": "50", "percent-2": "20"})
    assert refused.status_code == 400
    assert "add up to 70, not 100" in refused.content.decode()
    # The form keeps what was typed.
    assert [row["percent"] for row in refused.context["rows"]] == ["20", "50"]
    assert serving(deployed) == [(1, 10, "canary"), (2, 90, "")]
    assert client_for(members["viewer"]).post(url("function_traffic"), {"percent-1": "100"}).status_code == 403


# ---- environment and secrets -----------------------------------------------------------------

@pytest.mark.django_db
def test_env_and_secret_set_and_secret_value_never_shown(function, members, client_for):
    client = client_for(members["developer"])
    client.post(url("function_env"), {"kind": "env", "env-name": "LOG_LEVEL", "env-value": "debug"})
    client.post(url("function_env"), {"kind": "secret", "secret-name": "API_KEY", "secret-value": "s3cr3t-value"})
    assert EnvVar.objects.get(function=function).value == "debug"
    assert Secret.objects.get(function=function).name == "API_KEY"
    page = client.get(url("function_env"))
    assert b"LOG_LEVEL" in page.content and b"debug" in page.content
    assert b"API_KEY" in page.content and b"s3cr3t-value" not in page.content

    reserved = client.post(url("function_env"), {"kind": "env", "env-name": "PORT", "env-value": "1"})
    assert "reserved" in str(reserved.context["env_form"].errors["name"])
    clash = client.post(url("function_env"), {"kind": "secret", "secret-name": "LOG_LEVEL", "secret-value": "x"})
    assert "already a plain variable" in str(clash.context["secret_form"].errors["name"])


@pytest.mark.django_db
def test_removing_a_secret_asks_first(function, members, client_for):
    from functions.services import function_secret_set

    function_secret_set(acting_user=members["developer"], function=function, name="API_KEY", value="v")
    client = client_for(members["developer"])
    remove = url("function_env_remove", kind="secret", name="API_KEY")
    assert b"Remove the secret API_KEY?" in client.get(remove).content
    assert Secret.objects.filter(function=function).exists()
    client.post(remove)
    assert not Secret.objects.filter(function=function).exists()
    assert client.get(remove).status_code == 404


@pytest.mark.django_db
def test_viewer_cannot_touch_env(function, members, client_for):
    client = client_for(members["viewer"])
    page = client.get(url("function_env"))
    assert b'name="kind"' not in page.content
    response = client.post(url("function_env"), {"kind": "env", "env-name": "A", "env-value": "b"})
    assert response.status_code == 403
    assert not EnvVar.objects.filter(function=function).exists()


# ---- sharing ---------------------------------------------------------------------------------

@pytest.mark.django_db
def test_share_and_unshare_with_confirmation(function, members, client_for):
    guest = make_user("guest")
    client = client_for(members["admin"])
    assert client.post(url("function_sharing"), {"username": "guest", "level": "edit"}).status_code == 302
    assert sorted(function_direct_grants(function)[guest]) == ["change_function", "view_function"]
    page = client.get(url("function_sharing"))
    assert page.context["grants"] == [(guest, "edit")]

    missing = client.post(url("function_sharing"), {"username": "ghost", "level": "view"})
    assert "no user named" in str(missing.context["form"].errors["username"])

    remove = url("function_unshare", username="guest")
    assert b"Stop sharing hello with guest?" in client.get(remove).content
    client.post(remove)
    assert guest not in function_direct_grants(function)
    # Developers have no share permission: no form, and a POST is refused.
    dev = client_for(members["developer"])
    assert b"Share with a user" not in dev.get(url("function_sharing")).content
    assert dev.post(url("function_sharing"), {"username": "guest", "level": "view"}).status_code == 403


# ---- invocations -----------------------------------------------------------------------------

@pytest.mark.django_db
def test_invocations_table_and_empty_state(deployed, members, client_for):
    client = client_for(members["viewer"])
    assert b"No invocations recorded yet" in client.get(url("function_invocations")).content
    revision = Revision.objects.get(function=deployed, number=2)
    now = timezone.now()
    for i in range(60):
        Invocation.objects.create(function=deployed, revision=revision, started_at=now - timedelta(seconds=i),
                                  duration_ms=12.5, status="success" if i else "error", http_status=200 if i else 500,
                                  cold_start=i == 59, error="" if i else "ZeroDivisionError")
    page = client.get(url("function_invocations"))
    assert len(page.context["page"].object_list) == 50 and page.context["page"].paginator.count == 60
    assert b"Handler error" in page.content and b"12.5 ms" in page.content
    assert len(client.get(url("function_invocations"), {"page": 2}).context["page"].object_list) == 10


# ---- delete ----------------------------------------------------------------------------------

@pytest.mark.django_db
def test_delete_needs_the_typed_name(function, members, client_for, engine):
    client = client_for(members["admin"])
    page = client.get(url("function_delete"))
    assert b"Type the function" in page.content
    wrong = client.post(url("function_delete"), {"confirm_name": "hell"})
    assert wrong.status_code == 400 and "Type hello exactly" in wrong.content.decode()
    assert Function.objects.filter(pk=function.pk).exists()
    response = client.post(url("function_delete"), {"confirm_name": "hello"})
    assert response.status_code == 302 and response["Location"] == reverse("tenant_functions", args=["acme"])
    assert not Function.objects.filter(pk=function.pk).exists()


@pytest.mark.django_db
def test_developer_cannot_delete(function, members, client_for):
    client = client_for(members["developer"])
    assert b">Delete</a>" not in client.get(url("function_detail")).content
    assert client.post(url("function_delete"), {"confirm_name": "hello"}).status_code == 403
    assert Function.objects.filter(pk=function.pk).exists()
