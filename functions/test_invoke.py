"""Signed, short-lived permission for the IDE's test panel to call a function that requires an API
token, without handing the browser a token. The gateway accepts the signature in
``X-Nimbus-Test-Signature`` for the one function it names."""

from django.core import signing

SALT = "nimbus.test-invoke"
HEADER = "x-nimbus-test-signature"
MAX_AGE_SECONDS = 15 * 60


def test_signature(*, user_id: int, function_id: int) -> str:
    return signing.dumps({"f": function_id, "u": user_id}, salt=SALT, compress=False)


def check_test_signature(value: str, function_id: int) -> bool:
    try:
        data = signing.loads(value, salt=SALT, max_age=MAX_AGE_SECONDS)
    except signing.BadSignature:
        return False
    return isinstance(data, dict) and data.get("f") == function_id
