"""Engine selection (settings.NIMBUS_ENGINE). Nothing outside this package spawns processes or
talks to Kubernetes."""

import threading

from django.conf import settings
from django.utils.module_loading import import_string

ENGINES = {
    "local": "functions.engines.local.engine.LocalEngine",
    "knative": "functions.engines.knative.engine.KnativeEngine",
}

_lock = threading.Lock()
_engine = None


def get_engine():
    """The process-wide engine instance for settings.NIMBUS_ENGINE."""
    global _engine
    with _lock:
        if _engine is None or _engine.name != settings.NIMBUS_ENGINE:
            try:
                path = ENGINES[settings.NIMBUS_ENGINE]
            except KeyError:
                raise RuntimeError(f"Unknown NIMBUS_ENGINE {settings.NIMBUS_ENGINE!r}; use one of {sorted(ENGINES)}")
            _engine = import_string(path)()
        return _engine


def set_engine(engine) -> None:
    """Install an engine instance (tests, or a process that builds its own)."""
    global _engine
    with _lock:
        _engine = engine
