"""The IDE's socket answers bad input with an error message and stays open: a save whose text the
database cannot store (NUL, lone surrogates), and messages that are not JSON or nest too deep."""

import pytest
from asgiref.sync import sync_to_async

from functions.models import Function, SourceFile
from tests.webide.conftest import ide_session

pytestmark = pytest.mark.django_db(transaction=True)


@sync_to_async
def draft():
    function = Function.objects.get(name="hello")
    return function.source_version, dict(SourceFile.objects.filter(function=function).values_list("path", "content"))


async def still_open(ide):
    assert (await ide.ask("ping", "pong"))["type"] == "pong"


@pytest.mark.parametrize("content, words", [
    ("def handle(e, c):\n    return '\x00'\n", ["'handler.py'", "NUL", "line 2"]),
    ("x = '\ud800'\n", ["'handler.py'", "surrogate"]),
])
async def test_a_save_the_database_cannot_store_is_an_error_and_the_socket_stays_open(function, cookies, content,
                                                                                       words):
    before = await draft()
    async with ide_session(cookies["developer"]) as ide:
        refused = await ide.ask("save", "saved", path="handler.py", content=content, base_version=1)
        assert refused["type"] == "error" and refused["action"] == "save"
        assert refused["code"] == "invalid_source" and refused["field"] == "files"
        for word in words:
            assert word in refused["detail"]
        await still_open(ide)
        # The editor can go on: a good save right after works.
        saved = await ide.ask("save", "saved", path="handler.py", content="x = 1\n", base_version=1)
        assert saved["type"] == "saved" and saved["version"] == 2
    assert before[0] == 1 and (await draft())[1]["handler.py"] == "x = 1\n"


async def test_a_new_file_with_a_nul_is_an_error_too(function, cookies):
    async with ide_session(cookies["developer"]) as ide:
        refused = await ide.ask("create", "created", path="notes.txt", content="a\x00b", base_version=1)
        assert refused["type"] == "error" and "NUL" in refused["detail"]
        await still_open(ide)
    assert "notes.txt" not in (await draft())[1]


@pytest.mark.parametrize("text, words", [
    ("[" * 1000 + "]" * 1000, ["nested too deeply"]),
    ('{"action": "save", "path": ', ["not valid JSON"]),
])
async def test_messages_that_are_not_json_or_nest_too_deep_are_errors(function, cookies, text, words):
    async with ide_session(cookies["developer"]) as ide:
        await ide.communicator.send_to(text_data=text)
        refused = await ide.expect_type("error")
        assert refused["code"] == "invalid"
        for word in words:
            assert word in refused["detail"]
        await still_open(ide)


async def test_an_unexpected_failure_of_a_save_is_an_error_and_the_socket_stays_open(function, cookies, monkeypatch):
    from django.db import DataError

    from functions import services

    def fail(**kwargs):
        raise DataError("forced: the database refused the row")

    monkeypatch.setattr(services, "function_file_save", fail)
    async with ide_session(cookies["developer"]) as ide:
        refused = await ide.ask("save", "saved", path="handler.py", content="x = 1\n", base_version=1)
        assert (refused["type"], refused["action"], refused["code"]) == ("error", "save", "error")
        assert "failed" in refused["detail"]
        await still_open(ide)


@pytest.mark.parametrize("field, value", [("body", "a\x00b"), ("name", "n\x00"), ("headers", {"X-A": "\x00"}),
                                          ("body", "\udc80")])
async def test_a_test_event_the_database_cannot_store_is_an_error(function, cookies, field, value):
    event = {"name": "ping", "method": "POST", "path": "", "query": "", "headers": {}, "body": "{}", field: value}
    async with ide_session(cookies["developer"]) as ide:
        refused = await ide.ask("test_event_save", "test_event_saved", **event)
        assert (refused["type"], refused["code"], refused["field"]) == ("error", "invalid", field)
        await still_open(ide)
