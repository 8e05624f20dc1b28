"""``POST /events/<tenant>/``: the tenant's CloudEvents ingress (binary, structured or batched),
authenticated with an API token of that tenant that has the ``publish`` scope."""

from __future__ import annotations

from django.conf import settings
from django.http import JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from portal.errors import BodyTooLarge, NimbusError
from tenancy.models import Tenant


def _problem(status: int, code: str, detail: str, **extra) -> JsonResponse:
    response = JsonResponse({"code": code, "detail": detail, **extra}, status=status)
    if status == 401:
        response["WWW-Authenticate"] = 'Bearer realm="nimbus"'
    return response


@csrf_exempt
@require_POST
def events_ingress(request, tenant: str):
    from functions.services_triggers import events_publish
    from tenancy.services import token_authenticate

    scheme, _, plaintext = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not plaintext.strip():
        return _problem(401, "unauthenticated", "Publishing events needs an API token with the publish scope "
                                                "(Authorization: Bearer …).")
    token = token_authenticate(plaintext.strip())
    if token is None:
        return _problem(401, "unauthenticated", "The API token is invalid or expired.")
    if token.tenant.slug != tenant or token.tenant.status != Tenant.Status.ACTIVE:
        return _problem(404, "not_found", "Tenant not found.")  # another tenant's token learns nothing
    if not token.has_scope("publish"):
        # The token's scopes are already narrowed to its user's current role: publishing takes a
        # developer or above (tenancy.permissions.ROLE_TOKEN_SCOPES).
        return _problem(403, "permission_denied", "The API token lacks the publish scope, or its user's role "
                                                  "does not allow publishing (developers and above publish).")
    # A declared length over the limit was refused before (portal.middleware.BodyLimitMiddleware); a
    # chunked body is only known once read.
    if len(request.body) > settings.NIMBUS_MAX_BODY_BYTES:
        too_large = BodyTooLarge(settings.NIMBUS_MAX_BODY_BYTES)
        return JsonResponse(too_large.as_dict(), status=too_large.http_status)
    headers = {name.lower(): value for name, value in request.headers.items()}
    try:
        fanouts = events_publish(token=token, tenant=token.tenant, request_headers=headers, body=request.body)
    except NimbusError as exc:
        return JsonResponse(exc.as_dict(), status=exc.http_status)
    return JsonResponse({
        "accepted": len(fanouts),
        "events": [{"id": f.event_id, "type": f.type,
                    "deliveries": [{"function": name, "id": delivery_id} for name, delivery_id in f.deliveries]}
                   for f in fanouts],
    }, status=202)
