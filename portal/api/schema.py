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
    errors = serializers.DictField(child=serializers.ListField(child=serializers.CharField()), required=False,
                                   help_text="Every field's messages, for validation errors.")
    current_version = serializers.IntegerField(required=False, help_text="On stale_version: the draft's version now.")


ERRORS = {
    "400": "Invalid input: see field and errors.",
    "401": "Not signed in, or an invalid, expired or revoked API token.",
    "403": "Visible but not allowed: role, missing token scope, quota, or CSRF.",
    "404": "No such object, or one of another tenant.",
    "409": "Conflict with the current state (duplicate name, stale source version, last owner).",
}


class NimbusAutoSchema(AutoSchema):
    """Adds the documented error responses to every operation of the API."""

    def _get_response_bodies(self, direction="response"):
        responses = super()._get_response_bodies(direction)
        if not self.path.startswith("/api/v1/"):
            return responses
        codes = ["400", "401", "403", "404"]
        if self.method in ("POST", "PUT", "PATCH", "DELETE"):
            codes.append("409")
        for code in codes:
            if code not in responses:
                responses[code] = self._get_response_for_code(
                    OpenApiResponse(ErrorSerializer, description=ERRORS[code]), code, direction=direction)
        return responses
