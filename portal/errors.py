"""The domain error family. Services raise these; each edge (HTTP, WebSocket, CLI) turns them
into its own message in one place."""

try:
    from psycopg import OperationalError as PostgresOperationalError
    from psycopg_pool import PoolTimeout
except ImportError:  # pragma: no cover - both are installed with the project (pyproject.toml)
    PostgresOperationalError = PoolTimeout = type("Absent", (Exception,), {})


class NimbusError(Exception):
    """Base of every refusal a user can cause and read about."""

    code = "error"
    http_status = 400
    retry_after: int | None = None  # seconds, sent as Retry-After where a retry can succeed

    def __init__(self, message: str, *, field: str | None = None, details: dict | None = None):
        super().__init__(message)
        self.message = message
        self.field = field
        self.details = details or {}

    def as_dict(self) -> dict:
        data = {"code": self.code, "detail": self.message}
        if self.field:
            data["field"] = self.field
        if self.details:
            data.update(self.details)
        return data


class ValidationFailed(NimbusError):
    code = "invalid"

    def __init__(self, message: str, *, field: str | None = None, errors: dict | None = None):
        super().__init__(message, field=field, details={"errors": errors} if errors else None)
        self.errors = errors or ({field: [message]} if field else {})


class InvalidSource(ValidationFailed):
    code = "invalid_source"


class UriTooLong(ValidationFailed):
    """An address (path and query string) longer than what is stored of it: an async call's."""

    code = "uri_too_long"
    http_status = 414


class Conflict(NimbusError):
    code = "conflict"
    http_status = 409


class StaleVersion(Conflict):
    code = "stale_version"


class QuotaExceeded(NimbusError):
    code = "quota_exceeded"
    http_status = 403


class PermissionDenied(NimbusError):
    code = "permission_denied"
    http_status = 403


class NotFound(NimbusError):
    code = "not_found"
    http_status = 404


class EngineError(NimbusError):
    code = "engine_error"
    http_status = 502


class BodyTooLarge(NimbusError):
    """A request body over NIMBUS_MAX_BODY_BYTES, refused alike by the API, the event ingress and the
    gateway."""

    code = "too_large"
    http_status = 413

    def __init__(self, limit: int):
        super().__init__(f"The body exceeds {limit:,} bytes.", details={"limit": limit})


class DatabaseBusy(NimbusError):
    """No database connection came free in time (every one of the pool's is in use), or the server
    refuses more clients: the request is answered 503 with Retry-After rather than failing."""

    code = "unavailable"
    http_status = 503
    retry_after = 1  # seconds

    def __init__(self, message: str = "The service is busy; retry in a moment."):
        super().__init__(message)

    @staticmethod
    def caused(exc: BaseException | None) -> bool:
        """Whether ``exc``, or what it wraps (Django wraps psycopg's errors), says the database had
        no connection to give."""
        seen = set()
        while exc is not None and id(exc) not in seen:
            seen.add(id(exc))
            if isinstance(exc, DatabaseBusy | PoolTimeout):
                return True
            # Without the pool (or past it, when other processes took the server's slots): PostgreSQL's
            # refusal at connect, which psycopg raises without an SQLSTATE.
            if isinstance(exc, PostgresOperationalError) and any(text in str(exc) for text in REFUSED_CLIENT):
                return True
            # Only what an error says it was raised from: a fault raised while handling a busy pool
            # (its __context__) is that fault, not a busy database.
            exc = exc.__cause__
        return False


# What PostgreSQL says when it takes no more connections (max_connections, a role's or a database's limit).
REFUSED_CLIENT = ("too many clients", "too many connections", "remaining connection slots are reserved")
