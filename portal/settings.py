"""Settings for the Nimbus portal, read from the environment (see README, "Settings")."""

import os
from pathlib import Path

import dj_database_url

BASE_DIR = Path(__file__).resolve().parent.parent


def env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def env_list(name: str, default: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


DEBUG = env_bool("DEBUG", False)
# Where Nimbus keeps its own files: SQLite database, revision code, dependency cache, development keys.
NIMBUS_DATA_DIR = Path(os.environ.get("NIMBUS_DATA_DIR", BASE_DIR / "var")).resolve()
# Signed by the development key and encrypted by the development secrets key before installs made their
# own: kept for reading only (decrypting old secrets), never for signing or new secrets.
LEGACY_DEVELOPMENT_KEY = "dev-insecure-nimbus-key-change-me"


def local_key(name: str, make) -> list[str]:
    """Keys of a development install: made at random on first use and kept in the data folder with mode
    0600, so no two installs share one and restarts keep them. One key per line, newest first."""
    path = NIMBUS_DATA_DIR / name
    if not path.exists():
        NIMBUS_DATA_DIR.mkdir(parents=True, exist_ok=True)
        lines = [make()]
        if name == "secrets-key" and (NIMBUS_DATA_DIR / "nimbus.sqlite3").exists():
            # An older install encrypted its secrets with the key derived from the public development key.
            import base64
            import hashlib

            digest = hashlib.sha256(b"nimbus-secrets:" + LEGACY_DEVELOPMENT_KEY.encode()).digest()
            lines.append(base64.urlsafe_b64encode(digest).decode())
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it first: use theirs
            pass
        else:
            with os.fdopen(fd, "w") as file:
                file.write("\n".join(lines) + "\n")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


# A production start without SECRET_KEY fails loudly; a development run (DEBUG) or the tests get a random
# key of their own install, never a key written in the source.
DEVELOPMENT = DEBUG or bool(os.environ.get("NIMBUS_TESTING"))
SECRET_KEY = os.environ.get("SECRET_KEY") or (
    local_key("secret-key", lambda: __import__("secrets").token_urlsafe(50))[0] if DEVELOPMENT else "")
if not SECRET_KEY:
    raise RuntimeError("SECRET_KEY must be set (or DEBUG=1 for a development run)")

ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", "127.0.0.1,localhost,testserver")
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", "")

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.humanize",
    "rest_framework",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "guardian",
    "channels",
    "portal",
    "tenancy",
    "functions",
    "webide",
    "observability",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "portal.middleware.StorableAddressMiddleware",  # a NUL in a path or query: 400, not a 500 deeper in
    "portal.middleware.BodyLimitMiddleware",  # a body over NIMBUS_MAX_BODY_BYTES: 413 before anything reads it
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "portal.middleware.RequestContextMiddleware",
    "portal.middleware.DatabaseBusyMiddleware",  # no database connection in time: 503, not a 500
]

ROOT_URLCONF = "portal.urls"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "portal.context_processors.nimbus",
            ],
        },
    },
]

WSGI_APPLICATION = "portal.wsgi.application"
ASGI_APPLICATION = "portal.asgi.application"

# Database: SQLite file by default, anything dj-database-url understands with DATABASE_URL.
DATABASE_URL = os.environ.get("DATABASE_URL", "")
# On PostgreSQL the process holds at most NIMBUS_DB_POOL_MAX_SIZE connections (psycopg's pool), whatever
# the number of request threads; a request that gets none within NIMBUS_DB_POOL_TIMEOUT seconds answers
# 503 with Retry-After (portal/middleware.py). A max size of 0 turns the pool off: a connection per request
# thread, closed when the request ends (behind an external pooler such as PgBouncer, or as a baseline).
NIMBUS_DB_POOL_MIN_SIZE = int(os.environ.get("NIMBUS_DB_POOL_MIN_SIZE", "2"))
NIMBUS_DB_POOL_MAX_SIZE = int(os.environ.get("NIMBUS_DB_POOL_MAX_SIZE", "20"))
NIMBUS_DB_POOL_TIMEOUT = float(os.environ.get("NIMBUS_DB_POOL_TIMEOUT", "10"))
if DATABASE_URL:
    # No persistent connections: with the pool a request gives its connection back when it ends (the pool
    # requires CONN_MAX_AGE 0); without it, threads that come and go would each keep one open.
    DATABASES = {"default": dj_database_url.parse(DATABASE_URL, conn_max_age=0)}
    if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql" and NIMBUS_DB_POOL_MAX_SIZE > 0:
        DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
            "min_size": min(NIMBUS_DB_POOL_MIN_SIZE, NIMBUS_DB_POOL_MAX_SIZE),
            "max_size": NIMBUS_DB_POOL_MAX_SIZE,
            "timeout": NIMBUS_DB_POOL_TIMEOUT,
        }
else:
    NIMBUS_DATA_DIR.mkdir(parents=True, exist_ok=True)
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": os.environ.get("SQLITE_PATH", str(NIMBUS_DATA_DIR / "nimbus.sqlite3")),
            "OPTIONS": {"timeout": 20, "transaction_mode": "IMMEDIATE",
                        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;"},
        }
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# Channel layer: in-memory by default, Redis with REDIS_URL.
REDIS_URL = os.environ.get("REDIS_URL", "")
NIMBUS_REDIS_PREFIX = os.environ.get("NIMBUS_REDIS_PREFIX", "nimbus")  # of all keys: the layer's, tenancy.revocation's
if REDIS_URL:
    REDIS_SOCKET_TIMEOUT = float(os.environ.get("NIMBUS_REDIS_SOCKET_TIMEOUT", "30"))
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {
                # The layer's blocking receive waits up to 5 s on the server: redis-py's own 5 s socket
                # timeout would cut it (and drop every idle IDE socket); a longer one, keep-alives and a
                # health check still notice a Redis that is gone.
                "hosts": [{"address": REDIS_URL, "socket_timeout": REDIS_SOCKET_TIMEOUT, "socket_connect_timeout": 5,
                           "socket_keepalive": True, "health_check_interval": 30, "retry_on_timeout": True}],
                "prefix": NIMBUS_REDIS_PREFIX,
            },
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

AUTHENTICATION_BACKENDS = [
    "django.contrib.auth.backends.ModelBackend",
    "guardian.backends.ObjectPermissionBackend",
]
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "home"
LOGOUT_REDIRECT_URL = "login"

# django-guardian: no anonymous user row; object permissions live in direct-FK tables.
ANONYMOUS_USER_NAME = None
GUARDIAN_RAISE_403 = False

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "/static/"
STATIC_ROOT = Path(os.environ.get("STATIC_ROOT", BASE_DIR / "staticfiles"))
STATICFILES_DIRS = [BASE_DIR / "static"]
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"
        if DEBUG or os.environ.get("NIMBUS_TESTING")
        else "whitenoise.storage.CompressedManifestStaticFilesStorage"
    },
}
WHITENOISE_USE_FINDERS = DEBUG

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "tenancy.authentication.ApiTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["portal.api.permissions.NimbusApiPermission"],
    "DEFAULT_PAGINATION_CLASS": "portal.api.pagination.StandardPagination",
    "PAGE_SIZE": 50,
    "DEFAULT_FILTER_BACKENDS": [
        "django_filters.rest_framework.DjangoFilterBackend",
        "rest_framework.filters.SearchFilter",
        "rest_framework.filters.OrderingFilter",
    ],
    "DEFAULT_SCHEMA_CLASS": "portal.api.schema.NimbusAutoSchema",
    "EXCEPTION_HANDLER": "portal.api.exceptions.exception_handler",
    "DEFAULT_PARSER_CLASSES": [
        # JSON only, as the schema says: DRF's parser, with too deeply nested JSON a 400; a form or
        # multipart body answers 415.
        "portal.api.parsers.JSONParser",
    ],
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Nimbus API",
    "DESCRIPTION": "Tenants, functions, revisions, traffic, tokens and audit events.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
    # Several models have a "status" with different choices; name each enum after its model.
    "ENUM_NAME_OVERRIDES": {
        "TenantStatusEnum": "tenancy.models.Tenant.Status",
        "RevisionStatusEnum": "functions.models.Revision.Status",
        "InvocationStatusEnum": "functions.models.Invocation.Status",
    },
}

# Security headers; the deploy check (`manage.py check --deploy`) is clean when DEBUG is off.
SESSION_COOKIE_HTTPONLY = True
SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"
SECURE_REFERRER_POLICY = "same-origin"
if not DEBUG and not os.environ.get("NIMBUS_TESTING"):
    SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", True)
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_HSTS_SECONDS = int(os.environ.get("SECURE_HSTS_SECONDS", "31536000"))
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", True)

# ---- Nimbus ---------------------------------------------------------------------------
NIMBUS_ENGINE = os.environ.get("NIMBUS_ENGINE", "local")
# Key(s) for secrets at rest, comma-separated Fernet keys, newest first (rotation).
# Without it a key is derived from SECRET_KEY so a development install works out of the box.
NIMBUS_SECRETS_KEYS = env_list("NIMBUS_SECRETS_KEYS", "") or (
    local_key("secrets-key", lambda: __import__("cryptography.fernet").fernet.Fernet.generate_key().decode())
    if DEVELOPMENT and not os.environ.get("SECRET_KEY") else [])
# Private or special ranges (CIDRs) that the portal's own requests for users (delivery callbacks) may
# reach; only public addresses otherwise (functions/outbound.py).
NIMBUS_OUTBOUND_ALLOW_CIDRS = env_list("NIMBUS_OUTBOUND_ALLOW_CIDRS", "")
# Public base URL of the portal, used for invoke URLs shown to users.
NIMBUS_PUBLIC_URL = os.environ.get("NIMBUS_PUBLIC_URL", "http://127.0.0.1:8000").rstrip("/")
# Largest single source file and whole draft a function may have.
NIMBUS_MAX_FILE_BYTES = int(os.environ.get("NIMBUS_MAX_FILE_BYTES", str(512 * 1024)))
NIMBUS_MAX_SOURCE_BYTES = int(os.environ.get("NIMBUS_MAX_SOURCE_BYTES", str(2 * 1024 * 1024)))
NIMBUS_MAX_FILES = int(os.environ.get("NIMBUS_MAX_FILES", "200"))
# Largest request body, as sent, anywhere: the API and pages, the event ingress, the gateway on both
# engines. Over it: 413 in the API's error shape, naming the limit. Django's own limit is the same number
# (the request as sent is what both measure), so Django never refuses first with its HTML 400.
NIMBUS_MAX_BODY_BYTES = int(os.environ.get("NIMBUS_MAX_BODY_BYTES", str(6 * 1024 * 1024)))
DATA_UPLOAD_MAX_MEMORY_SIZE = NIMBUS_MAX_BODY_BYTES
# A whole draft travels as JSON, where each newline, quote, tab or backslash of source text takes two
# bytes and non-ASCII text sent as \uXXXX escapes up to three times its UTF-8 size: twice the source
# limit holds the largest draft of ordinary source text; a draft made mostly of escaped characters can
# still be refused (413, naming the limit), never cut.
if 2 * NIMBUS_MAX_SOURCE_BYTES > NIMBUS_MAX_BODY_BYTES:
    raise RuntimeError(f"NIMBUS_MAX_BODY_BYTES ({NIMBUS_MAX_BODY_BYTES}) must be at least twice "
                       f"NIMBUS_MAX_SOURCE_BYTES ({NIMBUS_MAX_SOURCE_BYTES}), so that the largest draft can be "
                       "saved as JSON.")
# Run the engine's part of a deploy in a background thread (the default) or inline (tests, CLI).
NIMBUS_DEPLOY_INLINE = env_bool("NIMBUS_DEPLOY_INLINE", False)
# Seconds between IDE presence beats; an editor silent for three beats (its process died) is dropped.
NIMBUS_IDE_PRESENCE_BEAT = float(os.environ.get("NIMBUS_IDE_PRESENCE_BEAT", "20"))

# Local engine (functions/engines/local): where revision code lives, and its defaults.
NIMBUS_LOCAL = {
    "CODE_DIR": NIMBUS_DATA_DIR / "revisions",
    "DEPS_CACHE_DIR": NIMBUS_DATA_DIR / "deps-cache",
    "SOCKET_DIR": Path(os.environ.get("NIMBUS_SOCKET_DIR", "/tmp/nimbus-sockets")),
    "IDLE_SECONDS": float(os.environ.get("NIMBUS_LOCAL_IDLE_SECONDS", "60")),
    "QUEUE_LIMIT": int(os.environ.get("NIMBUS_LOCAL_QUEUE_LIMIT", "100")),
    # bwrap (required to work) | none (functions NOT isolated: a warning at start and on every page).
    "SANDBOX": os.environ.get("NIMBUS_LOCAL_SANDBOX", "bwrap"),
    # Each tenant's processes run as host uid/gid BASE + tenant id when the portal is root (ids ≥ COUNT
    # are refused rather than wrapped onto another tenant's uid).
    "SANDBOX_UID_BASE": int(os.environ.get("NIMBUS_SANDBOX_UID_BASE", "2000000000")),
    "SANDBOX_UID_COUNT": int(os.environ.get("NIMBUS_SANDBOX_UID_COUNT", "65536")),
    # auto (cgroups where writable, else rlimits) | cgroup (required) | rlimit.
    "RESOURCES": os.environ.get("NIMBUS_LOCAL_RESOURCES", "auto"),
    # Private ranges (CIDRs) functions with egress, and dependency installers, may reach.
    "EGRESS_ALLOW_CIDRS": env_list("NIMBUS_EGRESS_ALLOW_CIDRS", ""),
    # The interpreter Python functions run on (empty: the portal's, or the system's when that is private).
    "PYTHON": os.environ.get("NIMBUS_LOCAL_PYTHON", ""),
    # Invocation records kept: the newest N per function, none older than D days.
    "RETENTION": {"MAX_PER_FUNCTION": int(os.environ.get("NIMBUS_RETENTION_PER_FUNCTION", "1000")),
                  "DAYS": float(os.environ.get("NIMBUS_RETENTION_DAYS", "7"))},
    # Per-instance limits besides memory (from the function's spec): CPU seconds, open files, processes.
    "INSTANCE_CPU_SECONDS": int(os.environ.get("NIMBUS_INSTANCE_CPU_SECONDS", "600")),
    "INSTANCE_OPEN_FILES": int(os.environ.get("NIMBUS_INSTANCE_OPEN_FILES", "256")),
    "INSTANCE_PROCESSES": int(os.environ.get("NIMBUS_INSTANCE_PROCESSES", "256")),
    # Hold each instance to its function's millicores (SIGSTOP/SIGCONT from a userspace throttle).
    "CPU_THROTTLE": env_bool("NIMBUS_LOCAL_CPU_THROTTLE", True),
    # Local folders of packages (wheelhouses, npm packages) that sandboxed installers may read.
    "DEPS_LOCAL_DIRS": env_list("NIMBUS_DEPS_LOCAL_DIRS", ""),
}

# Knative engine (functions/engines/knative).
NIMBUS_KNATIVE = {
    "KUBECONFIG": os.environ.get("NIMBUS_KUBECONFIG", ""),  # empty: in-cluster config
    "CONTEXT": os.environ.get("NIMBUS_KUBE_CONTEXT", ""),
    "NAMESPACE_PREFIX": os.environ.get("NIMBUS_NAMESPACE_PREFIX", "nimbus-"),
    "RUNTIME_IMAGES": {
        "python3.11": os.environ.get("NIMBUS_IMAGE_PYTHON", "ghcr.io/nimbus/runtime-python:3.11"),
        "node20": os.environ.get("NIMBUS_IMAGE_NODE", "ghcr.io/nimbus/runtime-node:20"),
    },
    "SANDBOX_RUNTIME_CLASS": os.environ.get("NIMBUS_SANDBOX_RUNTIME_CLASS", "gvisor"),
    "DEDICATED_NODE_LABEL": os.environ.get("NIMBUS_DEDICATED_NODE_LABEL", "nimbus.dev/tenant"),
    "DOMAIN": os.environ.get("NIMBUS_KNATIVE_DOMAIN", "example.com"),
    "REQUEST_TIMEOUT": float(os.environ.get("NIMBUS_KUBE_TIMEOUT", "10")),
    "RETRIES": int(os.environ.get("NIMBUS_KUBE_RETRIES", "3")),
    # How long a deploy waits for Knative to report the new revision ready; WAIT_READY off only
    # applies the objects (a bare API server without Knative's controllers never reports Ready).
    "DEPLOY_TIMEOUT": float(os.environ.get("NIMBUS_KNATIVE_DEPLOY_TIMEOUT", "300")),
    "WAIT_READY": env_bool("NIMBUS_KNATIVE_WAIT_READY", True),
    "CODE_DIR": os.environ.get("NIMBUS_CODE_DIR", "/var/nimbus/code"),
    "SCALE_TO_ZERO_RETENTION": os.environ.get("NIMBUS_SCALE_TO_ZERO_RETENTION", "0s"),
    # Where the portal (gateway /fn/, async calls, events, sequences) reaches a function's Service:
    # {service} is the Service name ("<tag>-<service>" for a tagged call), {namespace} the tenant's.
    "INTERNAL_URL": os.environ.get("NIMBUS_KNATIVE_INTERNAL_URL", "http://{service}.{namespace}.svc.cluster.local"),
    # Seconds the portal waits beyond a function's timeout (Knative times the request out first).
    "INVOKE_TIMEOUT_MARGIN": float(os.environ.get("NIMBUS_KNATIVE_INVOKE_TIMEOUT_MARGIN", "5")),
    # Seconds between the delivery worker's passes pulling function log lines from the pods into
    # the portal's log store (functions/engines/knative/logsync.py); 0 turns the pulls off.
    "LOG_PULL_SECONDS": float(os.environ.get("NIMBUS_KNATIVE_LOG_PULL_SECONDS", "5")),
}

# Observability (observability/): the operators' tools the Monitor tab embeds when set, the
# OTLP endpoint traces are exported to, and the bearer token in front of /metrics (without it /metrics
# is closed unless DEBUG is on: it names every tenant's functions).
GRAFANA_URL = os.environ.get("GRAFANA_URL", "").rstrip("/")
GRAFANA_DASHBOARD_UID = os.environ.get("GRAFANA_DASHBOARD_UID", "nimbus-function")
JAEGER_URL = os.environ.get("JAEGER_URL", "").rstrip("/")
KIBANA_URL = os.environ.get("KIBANA_URL", "").rstrip("/")
KIBANA_DATA_VIEW_ID = os.environ.get("KIBANA_DATA_VIEW_ID", "")
OTEL_EXPORTER_OTLP_ENDPOINT = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").rstrip("/")
NIMBUS_METRICS_TOKEN = os.environ.get("NIMBUS_METRICS_TOKEN", "")
NIMBUS_OBSERVABILITY = {
    "SPAN_DAYS": float(os.environ.get("NIMBUS_SPAN_RETENTION_DAYS", "7")),
    "ROLLUP_DAYS": float(os.environ.get("NIMBUS_ROLLUP_RETENTION_DAYS", "35")),
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "INFO")},
    "loggers": {"django.channels.server": {"level": "WARNING"}},
}
