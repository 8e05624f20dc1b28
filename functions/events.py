"""Function events (deploy progress, saves, status) sent to the channel group the IDE listens on."""

import logging

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

log = logging.getLogger(__name__)


def function_group(function_id: int) -> str:
    return f"function-{function_id}"


def publish_function_event(function_id: int, event: dict) -> None:
    """Send ``event`` (with a ``kind`` key, e.g. ``deploy.progress``) to the function's group.

    Callable from synchronous code in any thread; a failing channel layer never fails the caller.
    """
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        async_to_sync(layer.group_send)(function_group(function_id), {"type": "function.event", "event": event})
    except Exception:  # noqa: BLE001 - progress is best effort; the revision row is the record
        log.warning("could not publish %s for function %s", event.get("kind"), function_id, exc_info=True)
