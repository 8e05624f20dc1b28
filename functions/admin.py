"""Back office for functions, revisions and invocations. Source and settings change in the portal
and the IDE; operators here see everything and can take functions offline or bring them back."""

from django.contrib import admin
from django.db.models import Count

from functions import services
from functions.models import EnvVar, Function, Invocation, Revision, Secret, TrafficTarget
from tenancy.admin import ReadOnlyMixin, report
from portal.errors import NimbusError


class TrafficInline(ReadOnlyMixin, admin.TabularInline):
    model = TrafficTarget
    extra = 0
    can_delete = False
    fields = ("revision", "percent", "tag")
    readonly_fields = fields


class EnvVarInline(ReadOnlyMixin, admin.TabularInline):
    model = EnvVar
    extra = 0
    can_delete = False
    fields = ("name", "value")
    readonly_fields = fields


class SecretInline(ReadOnlyMixin, admin.TabularInline):
    model = Secret
    extra = 0
    can_delete = False
    fields = ("name", "updated_at")  # never the ciphertext
    readonly_fields = fields


@admin.register(Function)
class FunctionAdmin(ReadOnlyMixin, admin.ModelAdmin):
    list_display = ("name", "tenant", "runtime", "state", "memory_mb", "max_instances", "invoke_auth",
                    "revision_count", "updated_at")
    list_filter = ("state", "runtime", "invoke_auth", "tenant")
    search_fields = ("name", "description", "tenant__slug")
    list_select_related = ("tenant",)
    inlines = [TrafficInline, EnvVarInline, SecretInline]
    actions = ["take_offline", "bring_online"]
    date_hierarchy = "created_at"

    def get_queryset(self, request):
        return super().get_queryset(request).annotate(_revisions=Count("revisions"))

    @admin.display(ordering="_revisions", description="revisions")
    def revision_count(self, obj):
        return obj._revisions

    def delete_model(self, request, obj):
        services.function_delete(acting_user=request.user, function=obj)

    def delete_queryset(self, request, queryset):
        for function in queryset.select_related("tenant"):
            services.function_delete(acting_user=request.user, function=function)

    @admin.action(description="Take selected functions offline")
    def take_offline(self, request, queryset):
        done, failures = 0, []
        for function in queryset.select_related("tenant"):
            try:
                services.function_take_offline(acting_user=request.user, function=function)
                done += 1
            except NimbusError as exc:
                failures.append(f"{function}: {exc.message}")
        report(request, self, done, failures, "Took offline")

    @admin.action(description="Bring selected functions online")
    def bring_online(self, request, queryset):
        done, failures = 0, []
        for function in queryset.select_related("tenant"):
            try:
                services.function_bring_online(acting_user=request.user, function=function)
                done += 1
            except NimbusError as exc:
                failures.append(f"{function}: {exc.message}")
        report(request, self, done, failures, "Brought online")


@admin.register(Revision)
class RevisionAdmin(ReadOnlyMixin, admin.ModelAdmin):
    list_display = ("function", "number", "status", "author", "content_hash_short", "created_at", "deployed_at")
    list_filter = ("status", "function__tenant")
    search_fields = ("function__name", "function__tenant__slug", "content_hash", "message")
    list_select_related = ("function__tenant", "author")
    exclude = ("config",)  # holds secret ciphertexts
    date_hierarchy = "created_at"

    @admin.display(description="hash")
    def content_hash_short(self, obj):
        return obj.content_hash[:12]

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(Invocation)
class InvocationAdmin(ReadOnlyMixin, admin.ModelAdmin):
    list_display = ("id", "function", "revision", "status", "http_status", "duration_ms", "cold_start",
                    "started_at")
    list_filter = ("status", "cold_start", "trigger", "function__tenant")
    search_fields = ("id", "function__name", "trace_id", "error")
    list_select_related = ("function__tenant", "revision")
    date_hierarchy = "started_at"
    show_full_result_count = False  # invocation tables grow large; skip the COUNT(*) of the whole table
