"""Tenancy endpoints under /api/v1/: tenants by slug, members by username, tokens by prefix."""

from django.urls import path

from tenancy.api import views

app_name = "tenancy-api"

urlpatterns = [
    path("tenants/", views.TenantListView.as_view(), name="tenant-list"),
    path("tenants/<slug:tenant_slug>/", views.TenantDetailView.as_view(), name="tenant-detail"),
    path("tenants/<slug:tenant_slug>/members/", views.MemberListView.as_view(), name="member-list"),
    path("tenants/<slug:tenant_slug>/members/<str:username>/", views.MemberDetailView.as_view(),
         name="member-detail"),
    path("tenants/<slug:tenant_slug>/leave/", views.LeaveView.as_view(), name="tenant-leave"),
    path("tenants/<slug:tenant_slug>/tokens/", views.TokenListView.as_view(), name="token-list"),
    path("tenants/<slug:tenant_slug>/tokens/<str:prefix>/", views.TokenDetailView.as_view(), name="token-detail"),
    path("tenants/<slug:tenant_slug>/audit-events/", views.AuditEventListView.as_view(), name="audit-event-list"),
]
