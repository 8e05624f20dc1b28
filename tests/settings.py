"""Test settings: the portal's settings with test-friendly defaults (fast hashing, temp data dir)."""

import os
import tempfile

os.environ.setdefault("NIMBUS_TESTING", "1")
os.environ.setdefault("NIMBUS_DATA_DIR", tempfile.mkdtemp(prefix="nimbus-test-"))

from portal.settings import *  # noqa: E402,F403

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
NIMBUS_DEPLOY_INLINE = True
STATIC_ROOT = os.path.join(os.environ["NIMBUS_DATA_DIR"], "static")
os.makedirs(STATIC_ROOT, exist_ok=True)
