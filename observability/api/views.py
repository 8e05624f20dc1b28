"""Observability endpoints: a function's metrics over a range and its log search, the tenant's
metrics, and one trace's spans. Reads only, through the functions and tenancy selectors."""

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import generics
from rest_framework.exceptions import ValidationError
from rest_framework.response import Response
from rest_framework.views import APIView

from functions.selectors import function_for_user, functions_for_user
from functions.models import InvocationLog
from observability import selectors
from observability.api import serializers as s
from observability.forms import LogSearchForm
from portal.api.inputs import OUT_OF_RANGE, in_utc, query_choice, query_positive_int, refuse_parameter
from tenancy.selectors import tenant_for_user

RANGE_PARAMETER = OpenApiParameter("range", OpenApiTypes.STR, enum=list(selectors.RANGES),
                                   description="Time range (default 1h)")


class FunctionMetricsView(APIView):
    @extend_schema(summary="The function's metrics over a range (from per-minute rollups)",
                   parameters=[RANGE_PARAMETER], responses=s.MetricsSerializer)
    def get(self, request, tenant_slug, function_name):
        function = function_for_user(request.user, tenant_slug, function_name)
        metrics = selectors.function_metrics(function, query_choice(request, "range", list(selectors.RANGES)))
        return Response(s.MetricsSerializer(metrics).data)


class TenantMetricsView(APIView):
    @extend_schema(summary="The tenant's functions together over a range, with totals per function",
                   parameters=[RANGE_PARAMETER], responses=s.TenantMetricsSerializer)
    def get(self, request, tenant_slug):
        tenant = tenant_for_user(request.user, tenant_slug)
        visible = functions_for_user(request.user, tenant=tenant).values("pk")
        data = selectors.tenant_metrics(tenant, query_choice(request, "range", list(selectors.RANGES)), functions=visible)
        return Response(s.TenantMetricsSerializer(data).data)


TYPED_LOG_PARAMETERS = ("level", "revision", "invocation", "since", "until")


class LogSearchView(generics.ListAPIView):
    queryset = InvocationLog.objects.none()  # what the schema generator sees
    serializer_class = s.LogLineSerializer
    filter_backends = []

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):
            return self.queryset
        function = function_for_user(self.request.user, self.kwargs["tenant_slug"], self.kwargs["function_name"])
        for name in TYPED_LOG_PARAMETERS:
            # The page's form sends empty fields for "any"; an API client leaves the parameter out.
            if self.request.query_params.get(name, None) == "":
                refuse_parameter(name, "An empty value is not a valid one: leave the parameter out instead.")
        query_positive_int(self.request, "revision")  # the form's IntegerField would also take "1.0"
        form = LogSearchForm(self.request.query_params)
        if not form.is_valid():
            raise ValidationError({name: list(messages) for name, messages in form.errors.items()})
        for name in ("since", "until"):
            if form.cleaned_data.get(name) is not None:
                form.cleaned_data[name] = in_utc(form.cleaned_data[name])
                if form.cleaned_data[name] is None:
                    refuse_parameter(name, OUT_OF_RANGE)
        return selectors.logs_for_function(function, form.query())

    @extend_schema(summary="Search the function's log lines, newest first", parameters=[
        OpenApiParameter("q", OpenApiTypes.STR, description="Text the message contains"),
        OpenApiParameter("level", OpenApiTypes.STR, enum=list(selectors.LEVELS),
                         description="This level and the more severe ones"),
        OpenApiParameter("revision", OpenApiTypes.INT, description="Revision number"),
        OpenApiParameter("invocation", OpenApiTypes.UUID, description="Invocation id"),
        OpenApiParameter("since", OpenApiTypes.DATETIME), OpenApiParameter("until", OpenApiTypes.DATETIME)])
    def get(self, request, *args, **kwargs):
        return super().get(request, *args, **kwargs)


class TraceView(APIView):
    @extend_schema(summary="The spans of one trace (functions of this tenant you can see)",
                   responses=s.TraceSerializer)
    def get(self, request, tenant_slug, trace_id):
        tenant = tenant_for_user(request.user, tenant_slug)
        spans = selectors.trace_for_user(request.user, tenant, trace_id)
        return Response(s.TraceSerializer({"trace_id": trace_id.lower(), "spans": spans}).data)
