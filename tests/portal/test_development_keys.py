"""No shared keys: a development install makes its own SECRET_KEY and secrets key (mode 0600, kept and
reused in its data folder), and the IDE's test signature has a key of its own."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
READ_KEYS = ("import json, django; django.setup(); from django.conf import settings; "
             "print(json.dumps([settings.SECRET_KEY, settings.NIMBUS_SECRETS_KEYS]))")


def keys_of(data_dir: Path) -> tuple[str, list[str]]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("SECRET_KEY", "NIMBUS_TESTING", "NIMBUS_SECRETS_KEYS", "DATABASE_URL", "SQLITE_PATH")}
    env.update({"DJANGO_SETTINGS_MODULE": "portal.settings", "DEBUG": "1", "NIMBUS_DATA_DIR": str(data_dir)})
    result = subprocess.run([sys.executable, "-c", READ_KEYS], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    secret_key, secrets_keys = json.loads(result.stdout.strip().splitlines()[-1])
    return secret_key, secrets_keys


def test_each_install_makes_its_own_keys_and_keeps_them(tmp_path):
    first, second = tmp_path / "one", tmp_path / "two"
    key_one, secrets_one = keys_of(first)
    assert key_one != "dev-insecure-nimbus-key-change-me" and len(key_one) >= 50
    assert keys_of(first) == (key_one, secrets_one)  # reused on the next start
    key_two, secrets_two = keys_of(second)
    assert key_two != key_one and secrets_two != secrets_one
    for name in ("secret-key", "secrets-key"):
        assert stat.S_IMODE((first / name).stat().st_mode) == 0o600


def test_an_older_install_still_reads_its_secrets(tmp_path):
    """Secrets encrypted under the old public development key stay readable (a second, decrypt-only key);
    new ones are encrypted with the install's own key."""
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "nimbus.sqlite3").write_bytes(b"")
    _, secrets_keys = keys_of(tmp_path)
    assert len(secrets_keys) == 2
    from cryptography.fernet import Fernet, MultiFernet

    import base64
    import hashlib

    legacy = base64.urlsafe_b64encode(hashlib.sha256(b"nimbus-secrets:dev-insecure-nimbus-key-change-me").digest())
    old_secret = Fernet(legacy).encrypt(b"kept")
    fernet = MultiFernet([Fernet(k) for k in secrets_keys])
    assert fernet.decrypt(old_secret) == b"kept"
    with pytest.raises(Exception):
        Fernet(legacy).decrypt(fernet.encrypt(b"new"))  # new secrets are not under the public key


def test_the_test_signature_has_a_key_of_its_own(settings):
    from django.core import signing

    from functions.test_invoke import SALT, test_signature, test_signer

    good = test_signature(user_id=1, function_id=7)
    assert test_signer(good, 7) == 1 and test_signer(good, 8) is None
    # Signed with SECRET_KEY itself (what any other signature of the portal uses): refused.
    forged = signing.dumps({"f": 7, "u": 1}, salt=SALT, compress=False)
    assert test_signer(forged, 7) is None
