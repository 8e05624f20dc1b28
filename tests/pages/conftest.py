"""Fixtures for the page tests: an engine double that deploys at once, clients per role, and a
function with ready revisions."""

import pytest
from django.test import Client

from functions.engines import set_engine
from functions.engines.base import DeployEvent
from tests.doubles import RecordingEngine


@pytest.fixture(autouse=True)
def engine():
    # Accepts every deploy at once; the pages only need the revision rows that the services write.
    double = RecordingEngine(steps=[DeployEvent("done", "ok", "ready")], ready=True)
    set_engine(double)
    yield double
    set_engine(None)


@pytest.fixture
def client_for():
    """client_for(user) -> a logged-in test Client of its own (several users in one test)."""

    def make(user):
        client = Client()
        client.force_login(user)
        return client

    return make


@pytest.fixture
def deployed(function, members, django_capture_on_commit_callbacks):
    """The "hello" function with revisions 1 and 2 ready; revision 2 takes all traffic."""
    from functions.services import function_deploy

    for message in ("first", "second"):
        with django_capture_on_commit_callbacks(execute=True):
            function_deploy(acting_user=members["developer"], function=function, message=message)
    function.refresh_from_db()
    return function
