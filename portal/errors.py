"""The domain error family. Services raise these; each edge (HTTP, WebSocket, CLI) turns them
into its own message in one place."""


class NimbusError(Exception):
    """Base of every refusal a user can cause and read about."""

    code = "error"
    http_status = 400

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
