"""Observability endpoints under /api/v1/tenants/<tenant>/…"""

from django.urls import path

from observability.api import views

app_name = "observability-api"

FUNCTION = "tenants/<slug:tenant_slug>/functions/<slug:function_name>/"

urlpatterns = [
    path("tenants/<slug:tenant_slug>/metrics", views.TenantMetricsView.as_view(), name="tenant-metrics"),
    path("tenants/<slug:tenant_slug>/traces/<str:trace_id>/", views.TraceView.as_view(), name="trace-detail"),
    path(FUNCTION + "metrics", views.FunctionMetricsView.as_view(), name="function-metrics"),
    path(FUNCTION + "logs/", views.LogSearchView.as_view(), name="log-search"),
]
