"""Test settings: the portal's settings with test-friendly defaults (fast hashing, temp data dir)."""

import os
import secrets
import tempfile

os.environ.setdefault("NIMBUS_TESTING", "1")
# One random key for the run, inherited by the portal and worker processes that tests start.
os.environ.setdefault("SECRET_KEY", "test-" + secrets.token_urlsafe(40))
if "NIMBUS_DATA_DIR" not in os.environ:
    os.environ["NIMBUS_DATA_DIR"] = tempfile.mkdtemp(prefix="nimbus-test-")
    # The run that made it removes it when it ends (tests/conftest.py); processes it starts inherit it.
    os.environ["NIMBUS_TEST_DATA_DIR_OWNER"] = str(os.getpid())
# The tenants' sandbox uids reach their code through this folder (searchable, not listable).
os.makedirs(os.environ["NIMBUS_DATA_DIR"], exist_ok=True)
os.chmod(os.environ["NIMBUS_DATA_DIR"], 0o711)

from portal.settings import *  # noqa: E402,F403

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
NIMBUS_DEPLOY_INLINE = True
STATIC_ROOT = os.path.join(os.environ["NIMBUS_DATA_DIR"], "static")
os.makedirs(STATIC_ROOT, exist_ok=True)

if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":  # noqa: F405
    # A test database in a file, not SQLite's shared-cache memory database: threads (the delivery
    # worker, the records writer) then wait on each other's locks under WAL and the busy timeout,
    # where shared-cache table locks fail at once with "database table is locked".
    DATABASES["default"]["TEST"] = {"NAME": os.path.join(os.environ["NIMBUS_DATA_DIR"], "test.sqlite3")}  # noqa: F405
