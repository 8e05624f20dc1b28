"""Tenant self-service pages (the functions list at /t/<tenant>/ lives in functions/urls.py)."""

from django.urls import path

from tenancy import views

urlpatterns = [
    path("t/<slug:tenant>/members/", views.members, name="tenant_members"),
    path("t/<slug:tenant>/members/<int:membership_id>/role/", views.member_role, name="tenant_member_role"),
    path("t/<slug:tenant>/members/<int:membership_id>/remove/", views.member_remove, name="tenant_member_remove"),
    path("t/<slug:tenant>/leave/", views.member_leave, name="tenant_member_leave"),
    path("t/<slug:tenant>/tokens/", views.tokens, name="tenant_tokens"),
    path("t/<slug:tenant>/tokens/<int:token_id>/revoke/", views.token_revoke_view, name="tenant_token_revoke"),
    path("t/<slug:tenant>/quota/", views.quota, name="tenant_quota"),
    path("t/<slug:tenant>/audit/", views.audit, name="tenant_audit"),
]
