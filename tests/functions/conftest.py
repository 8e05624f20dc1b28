import pytest

from functions.engines import set_engine
from tests.doubles import RecordingEngine


@pytest.fixture
def engine():
    recording = RecordingEngine()
    set_engine(recording)
    yield recording
    set_engine(None)
