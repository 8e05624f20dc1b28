"""Signed, short-lived permission for the IDE's test panel to call a function that requires an API
token, without handing the browser a token. The gateway accepts the signature in
``X-Nimbus-Test-Signature`` for the one function it names."""

import hashlib

from django.conf import settings
from django.core import signing

SALT = "nimbus.test-invoke"
HEADER = "x-nimbus-test-signature"
MAX_AGE_SECONDS = 15 * 60


def _key() -> str:
    """A key of its own for these signatures, derived from SECRET_KEY: a signature made for another
    purpose with SECRET_KEY never passes as a test permission."""
    return hashlib.sha256(b"nimbus-test-invoke-key:" + settings.SECRET_KEY.encode()).hexdigest()


def test_signature(*, user_id: int, function_id: int) -> str:
    return signing.dumps({"f": function_id, "u": user_id}, key=_key(), salt=SALT, compress=False)


def test_signer(value: str, function_id: int) -> int | None:
    """The id of the user a valid, unexpired signature for this function was made for, or None."""
    try:
        data = signing.loads(value, key=_key(), salt=SALT, max_age=MAX_AGE_SECONDS)
    except signing.BadSignature:
        return None
    if not isinstance(data, dict) or data.get("f") != function_id or not isinstance(data.get("u"), int):
        return None
    return data["u"]


def check_test_signature(value: str, function_id: int) -> bool:
    """A valid signature for this function whose user may run it now: a member removed or
    downgraded since the editor handed it out is refused at once, not when it expires.
    Reads the database (call it off the event loop)."""
    from functions.invoke_access import signer_may_invoke

    user_id = test_signer(value, function_id)
    return user_id is not None and signer_may_invoke(user_id, function_id)
