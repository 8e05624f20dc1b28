"""OpenAPI (drf-spectacular) additions for what the API has beyond stock DRF: the API token
scheme, and the one error shape every operation can answer with."""

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.openapi import AutoSchema
from drf_spectacular.plumbing import build_bearer_security_scheme_object
from drf_spectacular.utils import OpenApiResponse
from rest_framework import serializers


class ApiTokenScheme(OpenApiAuthenticationExtension):
    target_class = "tenancy.authentication.ApiTokenAuthentication"
    name = "apiToken"

    def get_security_definition(self, auto_schema):
        scheme = build_bearer_security_scheme_object(header_name="Authorization", token_prefix="Bearer",
                                                     bearer_format="nmb_<prefix>_<secret>")
        scheme["description"] = ("A tenant's API token. Scopes: read (GET), write (changes), deploy "
                                 "(deploy, rollback, traffic, offline, online).")
        return scheme


class ErrorSerializer(serializers.Serializer):
    """What every refusal looks like (portal/api/exceptions.py)."""

    code = serializers.CharField(help_text="Machine-readable: invalid, not_authenticated, permission_denied, "
                                           "not_found, conflict, stale_version, quota_exceeded, …")
    detail = serializers.CharField(help_text="A sentence for a human.")
    field = serializers.CharField(required=False, help_text="The input field at fault, when there is one.")
    errors = serializers.DictField(
        child=serializers.ListField(child=serializers.CharField()), required=False,
        help_text="For validation errors: every message, by the dotted path of the input it is about "
                  "(\"name\", \"filters.0.value\", \"0.percent\" for an item of a list body; \"non_field_errors\" "
                  "for the input as a whole). Always this one flat level, however nested the input.")
    current_version = serializers.IntegerField(required=False, help_text="On stale_version: the draft's version now.")


ERRORS = {
    "400": "Invalid input: see field and errors.",
    "401": "Not signed in, or an invalid, expired or revoked API token.",
    "403": "Visible but not allowed: role, missing token scope, quota, or CSRF.",
    "404": "No such object, or one of another tenant.",
    "409": "Conflict with the current state (duplicate name, stale source version, last owner).",
    "415": "The body is not JSON (send Content-Type: application/json).",
}

# What the API's operations read a body as. No operation of the API takes a form or a file upload
# (uploads go through the IDE's own endpoint), so the schema offers JSON alone, whatever other
# parsers DRF has installed.
BODY_MEDIA_TYPES = ["application/json"]


class NimbusAutoSchema(AutoSchema):
    """Adds the documented error responses to every operation of the API, and says its bodies are JSON."""

    def map_parsers(self):
        parsers = super().map_parsers()
        if not self.path.startswith("/api/v1/"):
            return parsers
        return [media_type for media_type in parsers if media_type in BODY_MEDIA_TYPES]

    def _get_response_bodies(self, direction="response"):
        responses = super()._get_response_bodies(direction)
        if not self.path.startswith("/api/v1/"):
            return responses
        codes = ["400", "401", "403", "404"]
        if self.method in ("POST", "PUT", "PATCH", "DELETE"):
            codes.append("409")
        if self.method in ("POST", "PUT", "PATCH") and self.get_request_serializer() is not None:
            codes.append("415")
        for code in codes:
            if code not in responses:
                responses[code] = self._get_response_for_code(
                    OpenApiResponse(ErrorSerializer, description=ERRORS[code]), code, direction=direction)
        return responses
