"""Function endpoints under /api/v1/tenants/<tenant>/functions/<name>/…"""

from django.urls import path

from functions.api import views, views_triggers

app_name = "functions-api"

FUNCTION = "tenants/<slug:tenant_slug>/functions/<slug:function_name>/"

urlpatterns = [
    path("tenants/<slug:tenant_slug>/functions/", views.FunctionListView.as_view(), name="function-list"),
    path(FUNCTION, views.FunctionDetailView.as_view(), name="function-detail"),
    path(FUNCTION + "files/", views.FileListView.as_view(), name="file-list"),
    path(FUNCTION + "files/<path:path>", views.FileDetailView.as_view(), name="file-detail"),
    path(FUNCTION + "revisions/", views.RevisionListView.as_view(), name="revision-list"),
    path(FUNCTION + "revisions/<int:number>/", views.RevisionDetailView.as_view(), name="revision-detail"),
    path(FUNCTION + "deploy", views.DeployView.as_view(), name="function-deploy"),
    path(FUNCTION + "rollback", views.RollbackView.as_view(), name="function-rollback"),
    path(FUNCTION + "traffic", views.TrafficView.as_view(), name="function-traffic"),
    path(FUNCTION + "offline", views.OfflineView.as_view(), name="function-offline"),
    path(FUNCTION + "online", views.OnlineView.as_view(), name="function-online"),
    path(FUNCTION + "env/", views.EnvListView.as_view(), name="env-list"),
    path(FUNCTION + "env/<str:name>/", views.EnvDetailView.as_view(), name="env-detail"),
    path(FUNCTION + "secrets/", views.SecretListView.as_view(), name="secret-list"),
    path(FUNCTION + "secrets/<str:name>/", views.SecretDetailView.as_view(), name="secret-detail"),
    path(FUNCTION + "grants/", views.GrantListView.as_view(), name="grant-list"),
    path(FUNCTION + "grants/<str:username>/", views.GrantDetailView.as_view(), name="grant-detail"),
    path(FUNCTION + "invocations/", views.InvocationListView.as_view(), name="invocation-list"),
    path(FUNCTION + "invocations/<uuid:invocation_id>/", views.InvocationDetailView.as_view(),
         name="invocation-detail"),
    path(FUNCTION + "triggers/", views_triggers.TriggerListView.as_view(), name="trigger-list"),
    path(FUNCTION + "triggers/<slug:trigger_name>/", views_triggers.TriggerDetailView.as_view(),
         name="trigger-detail"),
    path(FUNCTION + "retry-policy", views_triggers.RetryPolicyView.as_view(), name="retry-policy"),
    path(FUNCTION + "deliveries/", views_triggers.DeliveryListView.as_view(), name="delivery-list"),
    path(FUNCTION + "deliveries/<uuid:delivery_id>/", views_triggers.DeliveryDetailView.as_view(),
         name="delivery-detail"),
    path(FUNCTION + "dead-letters/", views_triggers.DeadLetterListView.as_view(), name="dead-letter-list"),
    path(FUNCTION + "dead-letters/<uuid:delivery_id>/", views_triggers.DeadLetterDetailView.as_view(),
         name="dead-letter-detail"),
    path(FUNCTION + "dead-letters/<uuid:delivery_id>/replay", views_triggers.DeadLetterReplayView.as_view(),
         name="dead-letter-replay"),
    path("tenants/<slug:tenant_slug>/sequences/", views_triggers.SequenceListView.as_view(), name="sequence-list"),
    path("tenants/<slug:tenant_slug>/sequences/<slug:sequence_name>/", views_triggers.SequenceDetailView.as_view(),
         name="sequence-detail"),
    path("tenants/<slug:tenant_slug>/sequences/<slug:sequence_name>/start",
         views_triggers.SequenceStartView.as_view(), name="sequence-start"),
]
