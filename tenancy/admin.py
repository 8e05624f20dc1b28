"""Back office for platform operators: tenants, quotas, members, tokens and the audit trail.

Changes go through tenancy.services, so the admin leaves the same audit trail as the portal.
"""

from django.contrib import admin, messages
from django.db.models import Count

from portal.errors import NimbusError
from tenancy import services
from tenancy.models import ApiToken, AuditEvent, Membership, Quota, Tenant


def report(request, modeladmin, done: int, failures: list[str], verb: str) -> None:
    if done:
        modeladmin.message_user(request, f"{verb} {done} item(s).", messages.SUCCESS)
    for failure in failures:
        modeladmin.message_user(request, failure, messages.ERROR)


class ReadOnlyMixin:
    """Rows written only by services: visible, filterable, never edited by hand."""

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False


class MembershipInline(ReadOnlyMixin, admin.TabularInline):
    model = Membership
    extra = 0
    fields = ("user", "role", "created_at")
    readonly_fields = fields
    can_delete = False
    show_change_link = True


@admin.register(Tenant)
class TenantAdmin(admin.ModelAdmin):
    list_display = ("slug", "name", "status", "isolation", "member_count", "function_count", "created_at")
    list_filter = ("status", "isolation")
    search_fields = ("slug", "name")
    ordering = ("slug",)
    inlines = [MembershipInline]
    actions = ["suspend", "reactivate"]
    date_hierarchy = "created_at"

    def get_queryset(self, request):
        return super().get_queryset(request).annotate(
            _members=Count("memberships", distinct=True), _functions=Count("functions", distinct=True))

    @admin.display(ordering="_members", description="members")
    def member_count(self, obj):
        return obj._members

    @admin.display(ordering="_functions", description="functions")
    def function_count(self, obj):
        return obj._functions

    def get_readonly_fields(self, request, obj=None):
        return ("slug", "status", "created_at") if obj else ("status", "created_at")

    def save_model(self, request, obj, form, change):
        try:
            if change:
                services.tenant_update(acting_user=request.user, tenant=obj, name=obj.name, isolation=obj.isolation)
            else:
                created = services.tenant_create(acting_user=request.user, slug=obj.slug, name=obj.name,
                                                 isolation=obj.isolation)
                obj.pk = created.pk
        except NimbusError as exc:
            # The form already validated; what is left is a conflict or a refusal to report.
            self.message_user(request, exc.message, messages.ERROR)

    def delete_model(self, request, obj):
        services.audit_record(actor=request.user, action="tenant.delete", target=obj,
                              details={"slug": obj.slug})
        obj.delete()

    @admin.action(description="Suspend selected tenants")
    def suspend(self, request, queryset):
        done = 0
        for tenant in queryset:
            services.tenant_suspend(acting_user=request.user, tenant=tenant, reason="admin action")
            done += 1
        report(request, self, done, [], "Suspended")

    @admin.action(description="Reactivate selected tenants")
    def reactivate(self, request, queryset):
        done = 0
        for tenant in queryset:
            services.tenant_reactivate(acting_user=request.user, tenant=tenant)
            done += 1
        report(request, self, done, [], "Reactivated")


@admin.register(Quota)
class QuotaAdmin(admin.ModelAdmin):
    list_display = ("tenant", "max_functions", "max_memory_mb_per_function", "max_total_memory_mb",
                    "max_instances_per_function", "max_gpus", "max_concurrent_invocations")
    search_fields = ("tenant__slug",)
    readonly_fields = ("tenant",)
    list_select_related = ("tenant",)

    def has_add_permission(self, request):
        return False  # a quota is created with its tenant

    def has_delete_permission(self, request, obj=None):
        return False

    def save_model(self, request, obj, form, change):
        limits = {name: form.cleaned_data[name] for name in form.changed_data}
        obj.refresh_from_db()
        try:
            services.quota_update(acting_user=request.user, tenant=obj.tenant, **limits)
        except NimbusError as exc:
            self.message_user(request, exc.message, messages.ERROR)


@admin.register(Membership)
class MembershipAdmin(ReadOnlyMixin, admin.ModelAdmin):
    list_display = ("user", "tenant", "role", "created_at")
    list_filter = ("role", "tenant")
    search_fields = ("user__username", "tenant__slug")
    list_select_related = ("user", "tenant")

    def delete_model(self, request, obj):
        services.tenant_member_remove(acting_user=request.user, membership=obj)

    def delete_queryset(self, request, queryset):
        failures = []
        for membership in queryset:
            try:
                services.tenant_member_remove(acting_user=request.user, membership=membership)
            except NimbusError as exc:
                failures.append(f"{membership}: {exc.message}")
        report(request, self, 0, failures, "Removed")


@admin.register(ApiToken)
class ApiTokenAdmin(ReadOnlyMixin, admin.ModelAdmin):
    list_display = ("prefix", "name", "tenant", "user", "scope_list", "expires_at", "last_used_at", "revoked_at")
    list_filter = ("tenant", ("revoked_at", admin.EmptyFieldListFilter))
    search_fields = ("prefix", "name", "user__username", "tenant__slug")
    exclude = ("token_hash",)
    list_select_related = ("tenant", "user")
    actions = ["revoke"]

    @admin.display(description="scopes")
    def scope_list(self, obj):
        return ", ".join(obj.scopes)

    def has_delete_permission(self, request, obj=None):
        return False  # revoked, not deleted: the audit trail points at them

    @admin.action(description="Revoke selected tokens")
    def revoke(self, request, queryset):
        done = 0
        for token in queryset.filter(revoked_at__isnull=True):
            services.token_revoke(acting_user=request.user, token=token)
            done += 1
        report(request, self, done, [], "Revoked")


@admin.register(AuditEvent)
class AuditEventAdmin(ReadOnlyMixin, admin.ModelAdmin):
    list_display = ("created_at", "actor_name", "tenant", "action", "target_repr", "ip")
    list_filter = ("action", "tenant")
    search_fields = ("actor_name", "action", "target_repr")
    date_hierarchy = "created_at"
    list_select_related = ("tenant",)

    def has_delete_permission(self, request, obj=None):
        return False
