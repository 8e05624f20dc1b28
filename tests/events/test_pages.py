"""The Triggers tab: triggers with their next runs, adding and toggling, the retry policy, and the
dead-letter list with replay and discard (asking first)."""

import pytest
from django.test import Client

from functions.models import Delivery, RetryPolicy, Trigger
from functions.services_triggers import trigger_create
from functions.triggers import queue

URL = "/t/acme/f/hello/triggers/"


def client_for(user):
    client = Client()
    client.force_login(user)
    return client


@pytest.mark.django_db
def test_triggers_tab_lists_adds_and_toggles(function, members, outsider):
    client = client_for(members["developer"])
    page = client.get(URL)
    assert page.status_code == 200 and b"No cron or event triggers" in page.content
    added = client.post(URL, {"action": "add", "name": "nightly", "kind": "cron", "schedule": "0 3 * * *",
                              "time_zone": "Europe/Berlin"}, follow=True)
    assert b"Trigger added." in added.content
    assert added.content.count(b"<time datetime=") == 5  # the next five runs
    bad = client.post(URL, {"action": "add", "name": "bad", "kind": "cron", "schedule": "0 3 *"}, follow=True)
    assert b"has 3 fields" in bad.content
    client.post(URL, {"action": "add", "name": "orders", "kind": "event", "filter_attribute_0": "type",
                      "filter_match_0": "prefix", "filter_value_0": "com.example."})
    assert Trigger.objects.get(name="orders").filters == [{"attribute": "type", "value": "com.example.",
                                                           "match": "prefix"}]
    client.post(URL, {"action": "disable", "trigger": "nightly"})
    assert not Trigger.objects.get(name="nightly").enabled
    client.post(URL, {"action": "policy", "max_attempts": "5", "backoff_seconds": "2", "backoff_max_seconds": "60",
                      "max_event_age_seconds": "600"})
    assert RetryPolicy.objects.get(function=function).max_attempts == 5
    assert client_for(members["viewer"]).post(URL, {"action": "disable", "trigger": "orders"}).status_code == 403
    assert client_for(outsider).get(URL).status_code == 404
    confirm = client.get(URL + "nightly/remove/")
    assert confirm.status_code == 200 and b"Remove trigger nightly?" in confirm.content
    client.post(URL + "nightly/remove/")
    assert not Trigger.objects.filter(name="nightly").exists()


@pytest.mark.django_db
def test_dead_letters_replay_and_discard(function, members):
    dead = [queue.enqueue(function=function, source="async") for _ in range(2)]
    Delivery.objects.filter(pk__in=[d.pk for d in dead]).update(state="dead", attempts=3, last_error="boom")
    client = client_for(members["developer"])
    page = client.get(URL)
    assert page.content.count(b"Replay</button>") == 2 and b"boom" in page.content
    client.post(f"/t/acme/f/hello/dead-letters/{dead[0].pk}/replay/")
    assert Delivery.objects.get(pk=dead[0].pk).state == "pending"
    ask = client.get(f"/t/acme/f/hello/dead-letters/{dead[1].pk}/discard/")
    assert b"Discard this dead letter?" in ask.content
    assert Delivery.objects.get(pk=dead[1].pk).state == "dead"  # asking changes nothing
    client.post(f"/t/acme/f/hello/dead-letters/{dead[1].pk}/discard/")
    assert Delivery.objects.get(pk=dead[1].pk).state == "discarded"
    viewer = client_for(members["viewer"])
    assert viewer.get(URL).status_code == 200
    assert viewer.post(f"/t/acme/f/hello/dead-letters/{dead[0].pk}/replay/").status_code == 403


@pytest.mark.django_db
def test_triggers_page_query_count_does_not_grow_with_dead_letters(function, members, django_assert_max_num_queries):
    trigger_create(acting_user=members["developer"], function=function, name="ev", kind="event")
    for _ in range(15):
        queue.enqueue(function=function, source="event")
    Delivery.objects.update(state="dead")
    client = client_for(members["developer"])
    client.get(URL)
    with django_assert_max_num_queries(25):
        assert client.get(URL).status_code == 200
