"""Function pages under /t/<tenant>/ (the tenant's function list) and /t/<tenant>/f/<function>/."""

from django.urls import path

from functions import views, views_sequences, views_triggers
from functions.triggers.ingress import events_ingress

F = "t/<slug:tenant>/f/<slug:function>/"

urlpatterns = [
    path("events/<slug:tenant>/", events_ingress, name="events_ingress"),
    path("t/<slug:tenant>/", views.function_list, name="tenant_functions"),
    path("t/<slug:tenant>/starters/", views.starter_options, name="function_starter_options"),
    path("t/<slug:tenant>/sequences/", views_sequences.sequence_list, name="tenant_sequences"),
    path("t/<slug:tenant>/sequences/<slug:name>/", views_sequences.sequence_detail, name="tenant_sequence"),
    path("t/<slug:tenant>/sequences/<slug:name>/delete/", views_sequences.sequence_delete_view,
         name="tenant_sequence_delete"),
    path(F, views.function_detail, name="function_detail"),
    path(F + "state/", views.function_state, name="function_state"),
    path(F + "config/", views.function_config, name="function_config"),
    path(F + "files/", views.function_files, name="function_files"),
    path(F + "files/<path:path>", views.function_file, name="function_file"),
    path(F + "revisions/", views.function_revisions, name="function_revisions"),
    path(F + "revisions/table/", views.function_revisions_table, name="function_revisions_table"),
    path(F + "deploy/", views.function_deploy_view, name="function_deploy"),
    path(F + "revisions/<int:number>/rollback/", views.revision_rollback_view, name="revision_rollback"),
    path(F + "traffic/", views.function_traffic, name="function_traffic"),
    path(F + "env/", views.function_env, name="function_env"),
    path(F + "env/<str:kind>/<str:name>/remove/", views.function_env_remove, name="function_env_remove"),
    path(F + "sharing/", views.function_sharing, name="function_sharing"),
    path(F + "sharing/<str:username>/remove/", views.function_unshare_view, name="function_unshare"),
    path(F + "invocations/", views.function_invocations, name="function_invocations"),
    path(F + "delete/", views.function_delete_view, name="function_delete"),
    path(F + "triggers/", views_triggers.function_triggers, name="function_triggers"),
    path(F + "triggers/<slug:name>/remove/", views_triggers.trigger_delete_view, name="function_trigger_delete"),
    path(F + "dead-letters/<uuid:delivery_id>/<str:verb>/", views_triggers.dead_letter_view,
         name="function_dead_letter"),
]
