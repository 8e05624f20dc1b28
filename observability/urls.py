"""Observability pages (beside the function pages) and /metrics."""

from django.urls import path

from observability import views

F = "t/<slug:tenant>/f/<slug:function>/"

urlpatterns = [
    path("metrics", views.metrics_view, name="metrics"),
    path("t/<slug:tenant>/monitor/", views.tenant_monitor, name="tenant_monitor"),
    path("t/<slug:tenant>/traces/<str:trace_id>/", views.trace_detail, name="trace_detail"),
    path(F + "monitor/", views.function_monitor, name="function_monitor"),
    path(F + "logs/", views.function_logs, name="function_logs"),
]
