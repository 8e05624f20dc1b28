"""The tenant's Sequences pages: the list (search, empty state, pagination, create form for those who
may), one sequence (steps, Run form, runs step by step with trace and logs links) and deletion."""

import json
import re
from datetime import timedelta
from pathlib import Path

import pytest
from django.test import Client

from functions.models import Delivery, Sequence
from functions.services import function_create
from functions.services_triggers import sequence_create, sequence_start
from tests.events.conftest import DOUBLE, INCREMENT, handler, settled, wait_for

LIST = "/t/acme/sequences/"


def client_for(user, **options):
    client = Client(**options)
    client.force_login(user)
    return client


@pytest.fixture
def functions(tenant, members):
    """Two functions of acme (not deployed: the pages do not need them running)."""
    return [function_create(acting_user=members["developer"], tenant=tenant, name=name, starter="hello")
            for name in ("double", "increment")]


@pytest.fixture
def sequence(functions, tenant, members):
    return sequence_create(acting_user=members["developer"], tenant=tenant, name="math",
                           functions=["double", "increment", "double"], description="Doubles, adds one, doubles")


# ---- the list -------------------------------------------------------------------------------------------

@pytest.mark.django_db
def test_empty_list_explains_sequences_and_the_tab_is_there(tenant, members):
    page = client_for(members["developer"]).get(LIST)
    assert page.status_code == 200
    html = page.content.decode()
    assert "No sequences yet" in html and "each one's output becomes the next one's input" in html
    assert f'href="{LIST}"' in html and 'aria-current="page' in html  # the Sequences tab, active
    assert 'id="create-sequence"' in html
    assert b"Sequences" in client_for(members["developer"]).get("/t/acme/").content  # the tab on other tenant pages


@pytest.mark.django_db
def test_list_shows_steps_in_order_creator_and_last_run(sequence, members, functions):
    sequence_create(acting_user=members["developer"], tenant=sequence.tenant, name="single", functions=["increment"])
    older = sequence_start(acting_user=members["developer"], sequence=sequence, body=b'{"n": 1}')
    Delivery.objects.filter(pk=older.pk).update(state="dead", created_at=older.created_at - timedelta(minutes=5))
    sequence_start(acting_user=members["developer"], sequence=sequence, body=b'{"n": 2}')
    html = client_for(members["viewer"]).get(LIST).content.decode()
    assert html.index(">math<") < html.index(">single<")
    steps = html[html.index('aria-label="Steps of math"'):html.index('aria-label="Steps of single"')]
    assert re.findall(r'<a href="/t/acme/f/([a-z]+)/">', steps) == ["double", "increment", "double"]
    assert "Doubles, adds one, doubles" in html and "acme-developer" in html
    assert ">pending<" in html and ">failed<" not in html  # the newest run, not the older failed one
    assert "never run" in html


@pytest.mark.django_db
def test_search_by_name_and_pagination(functions, tenant, members):
    for i in range(27):
        sequence_create(acting_user=members["developer"], tenant=tenant, name=f"flow-{i:02d}", functions=["double"])
    sequence_create(acting_user=members["developer"], tenant=tenant, name="billing", functions=["increment"])
    client = client_for(members["developer"])
    first = client.get(LIST).content.decode()
    assert ">billing<" in first and ">flow-23<" in first and ">flow-24<" not in first
    assert "1–25 of 28" in first
    second = client.get(LIST + "?page=2").content.decode()
    assert ">flow-24<" in second and ">flow-26<" in second
    found = client.get(LIST + "?q=bill").content.decode()
    assert ">billing<" in found and "flow-" not in found
    none = client.get(LIST + "?q=nothing").content.decode()
    assert "No sequence name contains" in none


@pytest.mark.django_db
def test_list_query_count_does_not_grow_with_sequences(functions, tenant, members, django_assert_max_num_queries):
    def add(n):
        for i in range(n):
            s = sequence_create(acting_user=members["developer"], tenant=tenant, name=f"s-{Sequence.objects.count()}",
                                functions=["double", "increment"])
            sequence_start(acting_user=members["developer"], sequence=s, body=b"{}")

    client = client_for(members["developer"])
    add(2)
    with django_assert_max_num_queries(30) as few:
        assert client.get(LIST).status_code == 200
    add(10)
    with django_assert_max_num_queries(len(few.captured_queries)):
        assert client.get(LIST).status_code == 200


# ---- create ---------------------------------------------------------------------------------------------

@pytest.mark.django_db
def test_create_a_sequence_from_a_comma_or_line_separated_list(functions, members):
    client = client_for(members["developer"])
    page = client.get(LIST).content.decode()
    assert '<datalist id="tenant-function-names"><option value="double"><option value="increment"></datalist>' in page
    created = client.post(LIST, {"name": "math", "description": "d", "functions": "double, increment\ndouble"})
    assert created.status_code == 302 and created["Location"] == "/t/acme/sequences/math/"
    sequence = Sequence.objects.get(name="math")
    assert [s.function.name for s in sequence.steps.order_by("position")] == ["double", "increment", "double"]
    assert sequence.created_by == members["developer"]
    shown = client.get(created["Location"])
    assert b"Sequence math created with 3 steps." in shown.content


@pytest.mark.django_db
def test_create_shows_the_services_refusal_on_its_field(functions, members):
    client = client_for(members["developer"])
    bad = client.post(LIST, {"name": "math", "functions": "double, nope"})
    assert bad.status_code == 200
    html = bad.content.decode()
    field = html[html.index('id="id_functions"'):]
    assert "No function named nope in acme." in field[:field.index("</div>") + 200]
    assert 'value="double, nope"' in html  # the input is kept for correcting
    assert not Sequence.objects.exists()
    client.post(LIST, {"name": "math", "functions": "double"})
    taken = client.post(LIST, {"name": "math", "functions": "double"}).content.decode()
    assert "A sequence named &#x27;math&#x27; already exists in acme." in taken
    invalid = client.post(LIST, {"name": "Not A Name", "functions": "double"}).content.decode()
    assert "lowercase letters" in invalid
    empty = client.post(LIST, {"name": "x", "functions": " , "}).content.decode()
    assert "A sequence needs at least one function." in empty


@pytest.mark.django_db
def test_viewer_sees_no_forms_and_is_refused_on_post(sequence, members):
    viewer = client_for(members["viewer"])
    page = viewer.get(LIST).content.decode()
    assert ">math<" in page and 'id="create-sequence"' not in page
    assert viewer.post(LIST, {"name": "mine", "functions": "double"}).status_code == 403
    assert viewer.post(LIST, {"name": "", "functions": ""}).status_code == 403  # refused before validation
    assert not Sequence.objects.filter(name="mine").exists()
    detail = viewer.get("/t/acme/sequences/math/").content.decode()
    assert 'id="run-sequence"' not in detail and "Delete…" not in detail
    assert viewer.post("/t/acme/sequences/math/", {"input": "{}"}).status_code == 403
    assert viewer.get("/t/acme/sequences/math/delete/").status_code == 403
    assert viewer.post("/t/acme/sequences/math/delete/").status_code == 403
    assert not Delivery.objects.exists() and Sequence.objects.filter(name="math").exists()


# ---- one sequence ---------------------------------------------------------------------------------------

@pytest.mark.django_db
def test_detail_shows_steps_and_run_with_valid_json_queues_a_run(sequence, members):
    client = client_for(members["developer"])
    url = "/t/acme/sequences/math/"
    page = client.get(url).content.decode()
    steps = page[page.index('id="steps"'):page.index("</ol>", page.index('id="steps"'))]
    assert steps.count(">double<") == 2 and steps.index(">double<") < steps.index(">increment<")
    assert "Not run yet." in page and 'id="run-sequence"' in page and "Delete…" in page
    run = client.post(url, {"input": '{"n": 3}'}, follow=True)
    delivery = Delivery.objects.get()
    assert (delivery.sequence, delivery.step, bytes(delivery.body)) == (sequence, 0, b'{"n": 3}')
    html = run.content.decode()
    assert f"Run {delivery.run_id} queued" in html
    assert f'id="run-{delivery.run_id}"' in html and ">pending<" in html
    assert html.count("not reached") == 2  # steps two and three are not queued yet
    assert 'hx-trigger="every 2s"' in html  # the page follows the run in progress
    assert "/traces/" not in html  # nothing ran yet, so the trace has no spans


@pytest.mark.django_db
def test_run_with_invalid_json_is_a_form_error_and_queues_nothing(sequence, members):
    page = client_for(members["developer"]).post("/t/acme/sequences/math/", {"input": '{"n": 3'})
    assert page.status_code == 200
    html = page.content.decode()
    assert "This is not valid JSON" in html and "line 1" in html
    assert "{&quot;n&quot;: 3</textarea>" in html  # kept for correcting
    assert not Delivery.objects.exists()


@pytest.mark.django_db
def test_runs_are_grouped_newest_first_with_their_steps_and_paginated(sequence, members):
    developer = members["developer"]
    runs = [sequence_start(acting_user=developer, sequence=sequence, body=json.dumps({"n": i}).encode())
            for i in range(12)]
    first = runs[-1]
    # Step one succeeded and step two failed for good: the run failed; both rows show it.
    Delivery.objects.filter(pk=first.pk).update(state="succeeded", attempts=1, result_status=200,
                                                invocation_id="11111111-2222-3333-4444-555555555555")
    from functions.triggers import queue

    second = queue.enqueue(function=sequence.steps.get(position=1).function, source="sequence", sequence=sequence,
                           step=1, run_id=first.run_id)
    Delivery.objects.filter(pk=second.pk).update(state="dead", attempts=3, result_status=500,
                                                 last_error="RuntimeError: boom")
    client = client_for(developer)
    html = client.get("/t/acme/sequences/math/").content.decode()
    assert html.count('class="border-bottom run"') == 10
    assert html.index(f'id="run-{first.run_id}"') < html.index(f'id="run-{runs[-2].run_id}"')
    assert f'id="run-{runs[0].run_id}"' not in html and "1–10 of 12" in html
    newest = html[html.index(f'id="run-{first.run_id}"'):html.index(f'id="run-{runs[-2].run_id}"')]
    assert ">failed<" in newest and ">succeeded<" in newest and ">dead letter<" in newest
    assert "RuntimeError: boom" in newest and ">500<" in newest
    assert "<summary>Output</summary>" not in newest  # a failed run has no output to show
    assert ("/t/acme/f/double/logs/?invocation=11111111-2222-3333-4444-555555555555" in newest)
    assert f'href="/t/acme/traces/{first.trace_id}/"' in newest
    older = client.get("/t/acme/sequences/math/?page=2").content.decode()
    assert f'id="run-{runs[0].run_id}"' in older and older.count('class="border-bottom run"') == 2


@pytest.mark.django_db
def test_delete_asks_first(sequence, members):
    client = client_for(members["developer"])
    ask = client.get("/t/acme/sequences/math/delete/")
    assert ask.status_code == 200 and b"Delete sequence math?" in ask.content
    assert Sequence.objects.filter(name="math").exists()  # asking changes nothing
    done = client.post("/t/acme/sequences/math/delete/", follow=True)
    assert done.redirect_chain[-1][0] == LIST and b"Sequence math deleted." in done.content
    assert not Sequence.objects.filter(name="math").exists()
    assert client.get("/t/acme/sequences/math/").status_code == 404


@pytest.mark.django_db
def test_another_tenants_user_gets_404(sequence, outsider):
    client = client_for(outsider)
    assert client.get(LIST).status_code == 404
    assert client.get("/t/acme/sequences/math/").status_code == 404
    assert client.post("/t/acme/sequences/math/", {"input": "{}"}).status_code == 404
    assert client.get("/t/acme/sequences/math/delete/").status_code == 404
    assert client.post("/t/acme/sequences/math/delete/").status_code == 404
    assert client.get("/t/globex/sequences/math/").status_code == 404  # acme's sequence is not globex's
    assert not Delivery.objects.exists() and Sequence.objects.filter(name="math").exists()


@pytest.mark.django_db
def test_anonymous_is_sent_to_login(sequence):
    answer = Client().get("/t/acme/sequences/math/")
    assert answer.status_code == 302 and "login" in answer["Location"]


@pytest.mark.django_db
def test_csrf_is_enforced(sequence, members):
    client = client_for(members["developer"], enforce_csrf_checks=True)
    assert client.post(LIST, {"name": "other", "functions": "double"}).status_code == 403
    assert client.post("/t/acme/sequences/math/", {"input": "{}"}).status_code == 403
    assert client.post("/t/acme/sequences/math/delete/").status_code == 403
    assert not Delivery.objects.exists() and list(Sequence.objects.values_list("name", flat=True)) == ["math"]


# ---- a real run ---------------------------------------------------------------------------------------

@pytest.mark.django_db(transaction=True)
def test_a_run_from_the_page_completes_and_links_its_trace(engine, deploy, members, start_worker):
    deploy("double", handler(DOUBLE))
    deploy("increment", handler(INCREMENT))
    client = client_for(members["developer"])
    created = client.post(LIST, {"name": "math", "functions": "double\nincrement\ndouble"})
    assert created.status_code == 302
    started = client.post("/t/acme/sequences/math/", {"input": '{"n": 3}'})
    assert started.status_code == 302
    first = Delivery.objects.get()
    start_worker()
    settled(first.pk)
    last = wait_for(lambda: Delivery.objects.filter(run_id=first.run_id, step=2, state="succeeded").first(),
                    timeout=30)
    assert last is not None and json.loads(bytes(last.result_body)) == {"n": 14}

    html = client.get("/t/acme/sequences/math/").content.decode()
    run = html[html.index(f'id="run-{first.run_id}"'):]
    assert run.count(">succeeded<") == 4  # the run and its three steps
    assert "not reached" not in run and 'hx-trigger="every 2s"' not in html  # nothing left to follow
    # The run's output: the last step's answer, pretty-printed.
    assert '<summary>Output</summary><pre class="mono border rounded p-2 mb-0 mt-1 run-output">{\n  &quot;n&quot;: 14\n}</pre>' in run
    for delivery in Delivery.objects.filter(run_id=first.run_id):
        assert f"/logs/?invocation={delivery.invocation_id}" in run
    trace_url = f"/t/acme/traces/{first.trace_id}/"
    assert f'href="{trace_url}"' in run
    engine.records.flush()
    from observability.models import Span

    assert wait_for(lambda: Span.objects.filter(trace_id=first.trace_id, kind=Span.Kind.GATEWAY).count() == 3)
    trace = client.get(trace_url)
    assert trace.status_code == 200
    assert "sequence double" in trace.content.decode() and "sequence increment" in trace.content.decode()
    listed = client.get(LIST).content.decode()
    assert ">succeeded<" in listed


# ---- in a browser: the page follows a run in progress -----------------------------------------------------

CHROMIUM = "/usr/bin/chromium"


@pytest.mark.browser
@pytest.mark.django_db(transaction=True)
def test_the_page_follows_a_run_until_it_settles(live_server, engine, deploy, members, tenant, start_worker,
                                                 monkeypatch):
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's Chromium is missing (apt-get install chromium)")
    if not (Path(__file__).resolve().parents[2] / "static" / "vendor" / "htmx").is_dir():
        pytest.skip("run `make assets` first (static/vendor/ holds htmx and Bootstrap)")
    from django.db import connections

    deploy("double", handler(DOUBLE))
    deploy("increment", handler(INCREMENT))
    sequence_create(acting_user=members["developer"], tenant=tenant, name="math", functions=["double", "increment"])
    session = client_for(members["developer"]).cookies["sessionid"].value
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")  # ORM calls while Playwright's loop runs
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            context = browser.new_context()
            context.add_cookies([{"name": "sessionid", "value": session, "url": live_server.url}])
            page = context.new_page()
            page.goto(f"{live_server.url}/t/acme/sequences/math/")
            page.fill("#id_input", '{"n": 3}')
            page.keyboard.press("Tab")
            page.keyboard.press("Enter")  # the Run button, by keyboard
            page.wait_for_selector("#runs[hx-trigger]")  # queued: the page polls
            assert page.locator("#runs .run .badge").first.inner_text() == "pending"
            start_worker()
            # No reload: the polled runs card turns to succeeded, then stops polling.
            page.wait_for_function("!document.querySelector('#runs').hasAttribute('hx-trigger')", timeout=30000)
            assert page.locator("#runs .run .badge").first.inner_text() == "succeeded"
            assert page.locator("#runs a", has_text="Trace").count() == 1
        finally:
            browser.close()
            connections.close_all()


@pytest.mark.django_db
def test_a_run_output_is_shown_only_to_those_who_may_see_the_last_function(sequence, members, tenant):
    """The output is the last step's answer: hidden, like its logs, from a member who may not view
    that function (here the viewers' group lost its grant on "double")."""
    from guardian.shortcuts import remove_perm

    from functions.models import Function
    from tenancy.services import role_group

    developer = members["developer"]
    run = sequence_start(acting_user=developer, sequence=sequence, body=b'{"n": 1}')
    from functions.triggers import queue

    steps = {s.position: s.function for s in sequence.steps.all()}
    Delivery.objects.filter(pk=run.pk).update(state="succeeded", attempts=1, result_status=200)
    for position in (1, 2):
        later = queue.enqueue(function=steps[position], source="sequence", sequence=sequence, step=position,
                              run_id=run.run_id)
        Delivery.objects.filter(pk=later.pk).update(state="succeeded", attempts=1, result_status=200,
                                                    result_body=b'{"n": 6}')
    shown = client_for(developer).get("/t/acme/sequences/math/").content.decode()
    assert "<summary>Output</summary>" in shown and "&quot;n&quot;: 6" in shown
    remove_perm("functions.view_function", role_group(tenant, "viewer"), Function.objects.get(name="double"))
    hidden = client_for(members["viewer"]).get("/t/acme/sequences/math/").content.decode()
    assert f'id="run-{run.run_id}"' in hidden and ">succeeded<" in hidden
    assert "<summary>Output</summary>" not in hidden and "&quot;n&quot;: 6" not in hidden
