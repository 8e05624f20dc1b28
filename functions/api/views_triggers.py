"""REST endpoints for triggers, the retry policy, deliveries and dead letters of a function, and
the tenant's sequences. Reads go through functions.selectors, writes through
functions.services_triggers, like the other function endpoints."""

import json

from django.urls import reverse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiExample, OpenApiParameter, extend_schema
from rest_framework import generics, status
from rest_framework.response import Response
from rest_framework.views import APIView

from functions import selectors, services_triggers as services
from functions.api import serializers_triggers as s
from functions.api.views import function_or_404
from functions.models import Delivery
from functions.triggers.worker import result_document
from portal.api.filters import FILTER_BACKENDS
from portal.api.inputs import query_choice, valid_body
from portal.api.permissions import SCOPE_DEPLOY
from tenancy.selectors import tenant_for_user


# ---- triggers -------------------------------------------------------------------------------------------

class TriggerListView(APIView):
    @extend_schema(summary="The function's triggers (cron ones with their next five run times)",
                   responses=s.TriggerSerializer(many=True))
    def get(self, request, tenant_slug, function_name):
        function = function_or_404(request, tenant_slug, function_name)
        return Response(s.TriggerSerializer(selectors.triggers_for_function(function), many=True).data)

    @extend_schema(summary="Add a cron or event trigger", request=s.TriggerCreateSerializer,
                   responses={201: s.TriggerSerializer}, examples=[
                       OpenApiExample("Cron", request_only=True, value={
                           "name": "weekday-report", "kind": "cron", "schedule": "0 3 * * 1-5",
                           "time_zone": "Europe/Berlin"}),
                       OpenApiExample("Event", request_only=True, value={
                           "name": "on-order", "kind": "event",
                           "filters": [{"attribute": "type", "value": "order.", "match": "prefix"}]})])
    def post(self, request, tenant_slug, function_name):
        function = function_or_404(request, tenant_slug, function_name)
        data = valid_body(s.TriggerCreateSerializer, request.data)
        trigger = services.trigger_create(acting_user=request.user, function=function,
                                          filters=[dict(f) for f in data.pop("filters")], **data)
        return Response(s.TriggerSerializer(trigger).data, status=status.HTTP_201_CREATED)


class TriggerDetailView(APIView):
    @extend_schema(summary="One trigger", responses=s.TriggerSerializer)
    def get(self, request, tenant_slug, function_name, trigger_name):
        function = function_or_404(request, tenant_slug, function_name)
        return Response(s.TriggerSerializer(selectors.trigger_for_function(function, trigger_name)).data)

    @extend_schema(summary="Enable, disable or change a trigger", request=s.TriggerUpdateSerializer,
                   responses=s.TriggerSerializer)
    def patch(self, request, tenant_slug, function_name, trigger_name):
        function = function_or_404(request, tenant_slug, function_name)
        trigger = selectors.trigger_for_function(function, trigger_name)
        data = dict(valid_body(s.TriggerUpdateSerializer, request.data))
        if "filters" in data:
            data["filters"] = [dict(f) for f in data["filters"]]
        trigger = services.trigger_update(acting_user=request.user, trigger=trigger, **data)
        return Response(s.TriggerSerializer(trigger).data)

    @extend_schema(summary="Remove a trigger", request=None, responses={204: None})
    def delete(self, request, tenant_slug, function_name, trigger_name):
        function = function_or_404(request, tenant_slug, function_name)
        services.trigger_delete(acting_user=request.user,
                                trigger=selectors.trigger_for_function(function, trigger_name))
        return Response(status=status.HTTP_204_NO_CONTENT)


class RetryPolicyView(APIView):
    @extend_schema(summary="How async, cron, event and sequence deliveries are retried, and where async "
                           "results go when the caller names no callback",
                   responses=s.RetryPolicySerializer)
    def get(self, request, tenant_slug, function_name):
        function = function_or_404(request, tenant_slug, function_name)
        policy = selectors.retry_policy_for_function(function)
        return Response(s.RetryPolicySerializer(policy).data)

    @extend_schema(summary="Change the retry policy", request=s.RetryPolicySerializer,
                   responses=s.RetryPolicySerializer)
    def put(self, request, tenant_slug, function_name):
        function = function_or_404(request, tenant_slug, function_name)
        data = valid_body(s.RetryPolicySerializer, request.data, partial=True)
        policy = services.retry_policy_set(acting_user=request.user, function=function, **data)
        return Response(s.RetryPolicySerializer(policy).data)


# ---- deliveries and dead letters ------------------------------------------------------------------------

class DeliveryListView(generics.ListAPIView):
    queryset = Delivery.objects.none()
    serializer_class = s.DeliverySerializer
    filter_backends = FILTER_BACKENDS  # ordering, as on every list; the state is read below

    def delivery_state(self) -> str | None:
        return query_choice(self.request, "state", Delivery.State.values)

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):
            return self.queryset
        function = function_or_404(self.request, self.kwargs["tenant_slug"], self.kwargs["function_name"])
        state = self.delivery_state()
        return selectors.deliveries_for_function(function, state=state).select_related("trigger")

    @extend_schema(summary="Queued and finished deliveries (async calls, cron runs, events), newest first",
                   parameters=[OpenApiParameter("state", OpenApiTypes.STR, enum=Delivery.State.values)])
    def get(self, request, *args, **kwargs):
        return super().get(request, *args, **kwargs)


class DeadLetterListView(DeliveryListView):
    def delivery_state(self) -> str:
        return Delivery.State.DEAD  # whatever ?state= says: this list is the dead letters

    @extend_schema(summary="Deliveries that failed after their retries (dead letters)")
    def get(self, request, *args, **kwargs):
        return super().get(request, *args, **kwargs)


class DeliveryDetailView(APIView):
    @extend_schema(summary="An async invocation's state and, once finished, its result",
                   responses=s.DeliveryResultSerializer)
    def get(self, request, tenant_slug, function_name, delivery_id):
        function = function_or_404(request, tenant_slug, function_name)
        return Response(result_document(selectors.delivery_for_function(function, delivery_id)))


class DeadLetterReplayView(APIView):
    token_scope = SCOPE_DEPLOY

    @extend_schema(summary="Put a dead letter back on the queue (attempts start again)", request=None,
                   responses={202: s.AcceptedSerializer})
    def post(self, request, tenant_slug, function_name, delivery_id):
        function = function_or_404(request, tenant_slug, function_name)
        delivery = services.dead_letter_replay(acting_user=request.user,
                                               delivery=selectors.delivery_for_function(function, delivery_id))
        return Response(_accepted(request, tenant_slug, function_name, delivery), status=status.HTTP_202_ACCEPTED)


class DeadLetterDetailView(APIView):
    token_scope = SCOPE_DEPLOY

    @extend_schema(summary="Discard a dead letter", request=None, responses={204: None})
    def delete(self, request, tenant_slug, function_name, delivery_id):
        function = function_or_404(request, tenant_slug, function_name)
        services.dead_letter_discard(acting_user=request.user,
                                     delivery=selectors.delivery_for_function(function, delivery_id))
        return Response(status=status.HTTP_204_NO_CONTENT)


def _accepted(request, tenant_slug, function_name, delivery) -> dict:
    url = request.build_absolute_uri(reverse("functions-api:delivery-detail", kwargs={
        "tenant_slug": tenant_slug, "function_name": function_name, "delivery_id": delivery.pk}))
    accepted = {"id": str(delivery.pk), "state": delivery.state, "status_url": url}
    if delivery.trace_id:
        accepted["trace_id"] = delivery.trace_id
    return accepted


# ---- sequences -----------------------------------------------------------------------------------------

class SequenceListView(APIView):
    @extend_schema(summary="The tenant's sequences", responses=s.SequenceSerializer(many=True))
    def get(self, request, tenant_slug):
        tenant = tenant_for_user(request.user, tenant_slug)
        return Response(s.SequenceSerializer(selectors.sequences_for_tenant(request.user, tenant), many=True).data)

    @extend_schema(summary="Create a sequence of functions", request=s.SequenceCreateSerializer,
                   responses={201: s.SequenceSerializer}, examples=[OpenApiExample(
                       "Two steps", request_only=True,
                       value={"name": "checkout", "description": "Validate, then charge", "functions": ["hello", "world"]})])
    def post(self, request, tenant_slug):
        tenant = tenant_for_user(request.user, tenant_slug)
        data = valid_body(s.SequenceCreateSerializer, request.data)
        sequence = services.sequence_create(acting_user=request.user, tenant=tenant, **data)
        sequence = selectors.sequence_for_tenant(request.user, tenant, sequence.name)
        return Response(s.SequenceSerializer(sequence).data, status=status.HTTP_201_CREATED)


class SequenceDetailView(APIView):
    @extend_schema(summary="One sequence", responses=s.SequenceSerializer)
    def get(self, request, tenant_slug, sequence_name):
        tenant = tenant_for_user(request.user, tenant_slug)
        return Response(s.SequenceSerializer(selectors.sequence_for_tenant(request.user, tenant, sequence_name)).data)

    @extend_schema(summary="Delete a sequence", request=None, responses={204: None})
    def delete(self, request, tenant_slug, sequence_name):
        tenant = tenant_for_user(request.user, tenant_slug)
        services.sequence_delete(acting_user=request.user,
                                 sequence=selectors.sequence_for_tenant(request.user, tenant, sequence_name))
        return Response(status=status.HTTP_204_NO_CONTENT)


class SequenceStartView(APIView):
    token_scope = SCOPE_DEPLOY

    @extend_schema(summary="Run the sequence asynchronously; the status URL follows its first step",
                   request=s.SequenceStartSerializer, responses={202: s.AcceptedSerializer})
    def post(self, request, tenant_slug, sequence_name):
        tenant = tenant_for_user(request.user, tenant_slug)
        sequence = selectors.sequence_for_tenant(request.user, tenant, sequence_name)
        data = valid_body(s.SequenceStartSerializer, request.data)
        body = json.dumps(data["input"]).encode() if data["input"] is not None else b""
        delivery = services.sequence_start(acting_user=request.user, sequence=sequence, body=body,
                                           callback_url=data["callback_url"])
        first = sequence.steps.all()[0].function.name
        return Response(_accepted(request, tenant_slug, first, delivery), status=status.HTTP_202_ACCEPTED)
