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


def check_test_signature(value: str, function_id: int) -> bool:
    try:
        data = signing.loads(value, key=_key(), salt=SALT, max_age=MAX_AGE_SECONDS)
    except signing.BadSignature:
        return False
    return isinstance(data, dict) and data.get("f") == function_id
