"""REST endpoints for functions and everything that hangs off one: source files, revisions,
deploy / rollback / traffic / offline / online, environment, secrets, grants and invocations.

A function is addressed as ``tenants/<tenant>/functions/<name>/``. Every view reads through
functions.selectors (another tenant's function is 404) and writes through functions.services
(a function the caller sees but may not change is 403); verbs are one small view each.
"""

import django_filters
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiExample, OpenApiParameter, extend_schema
from rest_framework import generics, status
from rest_framework.response import Response
from rest_framework.views import APIView

from functions import selectors, services
from functions.api import serializers as s
from functions.models import Function, Invocation, Revision
from portal.api.filters import FILTER_BACKENDS, IntegerFilter
from portal.api.inputs import valid_body
from portal.api.permissions import SCOPE_DEPLOY
from portal.errors import NotFound
from tenancy.permissions import SHARE_LEVELS
from tenancy.selectors import tenant_for_user


def function_or_404(request, tenant_slug: str, function_name: str):
    return selectors.function_for_user(request.user, tenant_slug, function_name)


def function_detail(request, function) -> dict:
    context = {
        "request": request,
        "permissions": selectors.function_permissions(request.user, [function]),
        "traffic": selectors.traffic_for_function(function),
    }
    return s.FunctionDetailSerializer(function, context=context).data


# ---- functions -----------------------------------------------------------------------------

class FunctionListView(generics.ListAPIView):
    queryset = Function.objects.none()  # what the schema generator sees
    serializer_class = s.FunctionSerializer
    filter_backends = FILTER_BACKENDS
    filterset_fields = ["state", "runtime"]
    search_fields = ["name", "description"]
    ordering_fields = ["name", "created_at", "updated_at", "state", "runtime"]
    ordering = ["name"]

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):
            return self.queryset
        tenant = tenant_for_user(self.request.user, self.kwargs["tenant_slug"])
        return selectors.functions_for_user(self.request.user, tenant=tenant)

    @extend_schema(summary="List the functions the caller can see in a tenant")
    def get(self, request, *args, **kwargs):
        page = self.paginate_queryset(self.filter_queryset(self.get_queryset()))
        # One permission lookup for the whole page, not one per function.
        context = {"request": request, "permissions": selectors.function_permissions(request.user, page)}
        return self.get_paginated_response(s.FunctionSerializer(page, many=True, context=context).data)

    @extend_schema(summary="Create a function from a starter or from files", request=s.FunctionCreateSerializer,
                   responses={201: s.FunctionDetailSerializer})
    def post(self, request, tenant_slug):
        tenant = tenant_for_user(request.user, tenant_slug)
        data = dict(valid_body(s.FunctionCreateSerializer, request.data))
        function = services.function_create(acting_user=request.user, tenant=tenant, **data)
        function = function_or_404(request, tenant_slug, function.name)
        return Response(function_detail(request, function), status=status.HTTP_201_CREATED)


class FunctionDetailView(APIView):
    @extend_schema(summary="A function with its configuration, traffic, invoke URL and the caller's permissions",
                   responses=s.FunctionDetailSerializer)
    def get(self, request, tenant_slug, function_name):
        return Response(function_detail(request, function_or_404(request, tenant_slug, function_name)))

    @extend_schema(summary="Change settings (instance settings apply at the next deploy)",
                   request=s.FunctionConfigSerializer, responses=s.FunctionDetailSerializer)
    def patch(self, request, tenant_slug, function_name):
        function = function_or_404(request, tenant_slug, function_name)
        data = valid_body(s.FunctionConfigSerializer, request.data)
        services.function_update(acting_user=request.user, function=function, **data)
        return Response(function_detail(request, function_or_404(request, tenant_slug, function_name)))

    @extend_schema(summary="Delete a function and everything the engine holds for it", request=None,
                   responses={204: None})
    def delete(self, request, tenant_slug, function_name):
        function = function_or_404(request, tenant_slug, function_name)
        services.function_delete(acting_user=request.user, function=function)
        return Response(status=status.HTTP_204_NO_CONTENT)


# ---- source files --------------------------------------------------------------------------

def _source_tree(function) -> dict:
    files = [{"path": f.path, "size": len(f.content.encode())} for f in selectors.source_files_for_function(function)]
    return {"version": function.source_version, "files": files}


class FileListView(APIView):
    @extend_schema(operation_id="function_files_list",
                   summary="The draft's files (paths and sizes) and its source version",
                   responses=s.SourceTreeSerializer)
    def get(self, request, tenant_slug, function_name):
        return Response(_source_tree(function_or_404(request, tenant_slug, function_name)))

    @extend_schema(operation_id="function_files_replace",
                   summary="Replace the whole draft; refused with 409 stale_version if base_version is old",
                   request=s.SourceReplaceSerializer, responses=s.SourceTreeSerializer)
    def put(self, request, tenant_slug, function_name):
        function = function_or_404(request, tenant_slug, function_name)
        data = valid_body(s.SourceReplaceSerializer, request.data)
        services.function_source_replace(acting_user=request.user, function=function, files=data["files"],
                                         base_version=data["base_version"])
        return Response(_source_tree(function_or_404(request, tenant_slug, function_name)))


class FileDetailView(APIView):
    @extend_schema(summary="One file of the draft, with its content", responses=s.SourceFileContentSerializer)
    def get(self, request, tenant_slug, function_name, path):
        function = function_or_404(request, tenant_slug, function_name)
        source = selectors.source_file_for_function(function, path)
        return Response({"path": source.path, "size": len(source.content.encode()), "content": source.content,
                         "version": function.source_version})

    @extend_schema(summary="Create or overwrite one file", request=s.FileSaveSerializer,
                   responses=s.SourceVersionSerializer)
    def put(self, request, tenant_slug, function_name, path):
        function = function_or_404(request, tenant_slug, function_name)
        data = valid_body(s.FileSaveSerializer, request.data)
        version = services.function_file_save(acting_user=request.user, function=function, path=path,
                                              content=data["content"], base_version=data["base_version"])
        return Response({"path": path, "version": version})

    @extend_schema(summary="Delete one file", request=None, responses={200: s.SourceVersionSerializer},
                   parameters=[OpenApiParameter("base_version", OpenApiTypes.INT, required=True)])
    def delete(self, request, tenant_slug, function_name, path):
        function = function_or_404(request, tenant_slug, function_name)
        query = s.BaseVersionSerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        data = query.validated_data
        version = services.function_file_delete(acting_user=request.user, function=function, path=path,
                                                base_version=data["base_version"])
        return Response({"path": path, "version": version})

    @extend_schema(summary="Rename (move) one file", request=s.FileRenameSerializer,
                   responses=s.SourceVersionSerializer)
    def post(self, request, tenant_slug, function_name, path):
        function = function_or_404(request, tenant_slug, function_name)
        data = valid_body(s.FileRenameSerializer, request.data)
        version = services.function_file_rename(acting_user=request.user, function=function, path=path,
                                                new_path=data["new_path"], base_version=data["base_version"])
        return Response({"path": data["new_path"], "version": version})


# ---- revisions, deploy, traffic ------------------------------------------------------------

class RevisionListView(generics.ListAPIView):
    queryset = Revision.objects.none()  # what the schema generator sees
    serializer_class = s.RevisionSerializer
    filter_backends = FILTER_BACKENDS
    filterset_fields = ["status"]
    search_fields = ["message"]
    ordering_fields = ["number", "created_at"]
    ordering = ["-number"]

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):
            return self.queryset
        function = function_or_404(self.request, self.kwargs["tenant_slug"], self.kwargs["function_name"])
        return selectors.revisions_for_function(function)

    @extend_schema(summary="The function's revisions, newest first")
    def get(self, request, *args, **kwargs):
        return super().get(request, *args, **kwargs)


class RevisionDetailView(APIView):
    @extend_schema(summary="One revision with its frozen files and configuration (secret names only)",
                   responses=s.RevisionDetailSerializer)
    def get(self, request, tenant_slug, function_name, number):
        function = function_or_404(request, tenant_slug, function_name)
        return Response(s.RevisionDetailSerializer(selectors.revision_for_function(function, number)).data)


class DeployView(APIView):
    token_scope = SCOPE_DEPLOY

    @extend_schema(summary="Freeze the draft into a new revision and roll it out (asynchronously)",
                   request=s.DeploySerializer, responses={202: s.RevisionSerializer})
    def post(self, request, tenant_slug, function_name):
        function = function_or_404(request, tenant_slug, function_name)
        data = valid_body(s.DeploySerializer, request.data)
        revision = services.function_deploy(acting_user=request.user, function=function, message=data["message"],
                                            promote=data["promote"])
        return Response(s.RevisionSerializer(revision).data, status=status.HTTP_202_ACCEPTED)


class RollbackView(APIView):
    token_scope = SCOPE_DEPLOY

    @extend_schema(summary="Send all traffic back to an earlier ready revision", request=s.RollbackSerializer,
                   responses=s.FunctionDetailSerializer)
    def post(self, request, tenant_slug, function_name):
        function = function_or_404(request, tenant_slug, function_name)
        data = valid_body(s.RollbackSerializer, request.data)
        services.revision_rollback(acting_user=request.user, function=function, number=data["revision"])
        return Response(function_detail(request, function_or_404(request, tenant_slug, function_name)))


class TrafficView(APIView):
    token_scope = SCOPE_DEPLOY

    @extend_schema(summary="How requests are split between revisions", responses=s.TrafficTargetSerializer(many=True))
    def get(self, request, tenant_slug, function_name):
        function = function_or_404(request, tenant_slug, function_name)
        return Response(s.TrafficTargetSerializer(selectors.traffic_for_function(function), many=True).data)

    @extend_schema(summary="Split traffic between ready revisions (percentages add up to 100)",
                   request=s.TrafficInputSerializer(many=True), responses=s.TrafficTargetSerializer(many=True))
    def put(self, request, tenant_slug, function_name):
        function = function_or_404(request, tenant_slug, function_name)
        targets = valid_body(s.TrafficInputSerializer, request.data, many=True)
        services.function_traffic_set(acting_user=request.user, function=function,
                                      targets=[dict(target) for target in targets])
        return Response(s.TrafficTargetSerializer(selectors.traffic_for_function(function), many=True).data)


class OfflineView(APIView):
    token_scope = SCOPE_DEPLOY

    @extend_schema(summary="Stop serving the function and release its instances", request=None,
                   responses=s.FunctionDetailSerializer)
    def post(self, request, tenant_slug, function_name):
        function = function_or_404(request, tenant_slug, function_name)
        services.function_take_offline(acting_user=request.user, function=function)
        return Response(function_detail(request, function_or_404(request, tenant_slug, function_name)))


class OnlineView(APIView):
    token_scope = SCOPE_DEPLOY

    @extend_schema(summary="Serve an offline function again", request=None, responses=s.FunctionDetailSerializer)
    def post(self, request, tenant_slug, function_name):
        function = function_or_404(request, tenant_slug, function_name)
        services.function_bring_online(acting_user=request.user, function=function)
        return Response(function_detail(request, function_or_404(request, tenant_slug, function_name)))


# ---- environment, secrets, grants ----------------------------------------------------------

class EnvListView(APIView):
    @extend_schema(summary="The function's environment variables", responses=s.EnvVarSerializer(many=True))
    def get(self, request, tenant_slug, function_name):
        function = function_or_404(request, tenant_slug, function_name)
        return Response(s.EnvVarSerializer(selectors.env_vars_for_function(function), many=True).data)

    @extend_schema(summary="Set one variable (used from the next deploy)", request=s.EnvVarInputSerializer,
                   responses=s.EnvVarSerializer)
    def put(self, request, tenant_slug, function_name):
        function = function_or_404(request, tenant_slug, function_name)
        data = valid_body(s.EnvVarInputSerializer, request.data)
        env = services.function_env_set(acting_user=request.user, function=function, name=data["name"],
                                        value=data["value"])
        return Response(s.EnvVarSerializer(env).data)


class EnvDetailView(APIView):
    @extend_schema(summary="Remove one variable", request=None, responses={204: None})
    def delete(self, request, tenant_slug, function_name, name):
        function = function_or_404(request, tenant_slug, function_name)
        services.function_env_delete(acting_user=request.user, function=function, name=name)
        return Response(status=status.HTTP_204_NO_CONTENT)


class SecretListView(APIView):
    @extend_schema(summary="The function's secrets: names and when they changed, never values",
                   responses=s.SecretSerializer(many=True))
    def get(self, request, tenant_slug, function_name):
        function = function_or_404(request, tenant_slug, function_name)
        return Response(s.SecretSerializer(selectors.secrets_for_function(function), many=True).data)

    @extend_schema(summary="Set one secret (write-only; encrypted at rest)", request=s.SecretInputSerializer,
                   responses=s.SecretSerializer)
    def put(self, request, tenant_slug, function_name):
        function = function_or_404(request, tenant_slug, function_name)
        data = valid_body(s.SecretInputSerializer, request.data)
        secret = services.function_secret_set(acting_user=request.user, function=function, name=data["name"],
                                              value=data["value"])
        return Response(s.SecretSerializer(secret).data)


class SecretDetailView(APIView):
    @extend_schema(summary="Remove one secret", request=None, responses={204: None})
    def delete(self, request, tenant_slug, function_name, name):
        function = function_or_404(request, tenant_slug, function_name)
        services.function_secret_delete(acting_user=request.user, function=function, name=name)
        return Response(status=status.HTTP_204_NO_CONTENT)


def share_level(perms) -> str:
    """The widest sharing level the granted permissions amount to."""
    perms = set(perms)
    for level in sorted(SHARE_LEVELS, key=lambda lvl: len(SHARE_LEVELS[lvl]), reverse=True):
        if SHARE_LEVELS[level] <= perms:
            return level
    return "view"


def _grants(function) -> list[dict]:
    grants = selectors.function_direct_grants(function)
    return sorted(({"username": user.get_username(), "level": share_level(perms), "permissions": sorted(perms)}
                   for user, perms in grants.items()), key=lambda grant: grant["username"])


class GrantListView(APIView):
    @extend_schema(summary="Users this function is shared with directly (on top of tenant roles)",
                   responses=s.GrantSerializer(many=True))
    def get(self, request, tenant_slug, function_name):
        return Response(_grants(function_or_404(request, tenant_slug, function_name)))

    @extend_schema(summary="Share the function with one user at a level: view, edit or deploy",
                   request=s.GrantInputSerializer, responses=s.GrantSerializer, examples=[OpenApiExample(
                       "Edit", request_only=True, value={"username": "friend", "level": "edit"})])
    def put(self, request, tenant_slug, function_name):
        function = function_or_404(request, tenant_slug, function_name)
        data = valid_body(s.GrantInputSerializer, request.data)
        services.function_share(acting_user=request.user, function=function, username=data["username"],
                                level=data["level"])
        grant = next(g for g in _grants(function) if g["username"] == data["username"])
        return Response(grant)


class GrantDetailView(APIView):
    @extend_schema(summary="Stop sharing the function with one user", request=None, responses={204: None})
    def delete(self, request, tenant_slug, function_name, username):
        function = function_or_404(request, tenant_slug, function_name)
        if not any(g["username"] == username for g in _grants(function)):
            raise NotFound(f"The function is not shared with '{username}'.")
        services.function_unshare(acting_user=request.user, function=function, username=username)
        return Response(status=status.HTTP_204_NO_CONTENT)


# ---- invocations ---------------------------------------------------------------------------

class InvocationFilter(django_filters.FilterSet):
    status = django_filters.ChoiceFilter(choices=Invocation.Status.choices)
    revision = IntegerFilter(field_name="revision__number", help_text="Only invocations served by this revision number")

    class Meta:
        model = Invocation
        fields = ["status", "revision"]


class InvocationListView(generics.ListAPIView):
    queryset = Invocation.objects.none()  # what the schema generator sees
    serializer_class = s.InvocationSerializer
    filterset_class = InvocationFilter
    filter_backends = FILTER_BACKENDS
    ordering_fields = ["started_at", "duration_ms"]
    ordering = ["-started_at"]

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):
            return self.queryset
        function = function_or_404(self.request, self.kwargs["tenant_slug"], self.kwargs["function_name"])
        return selectors.invocations_for_function(function)

    @extend_schema(summary="The function's invocations, newest first (read-only)")
    def get(self, request, *args, **kwargs):
        return super().get(request, *args, **kwargs)


class InvocationDetailView(APIView):
    @extend_schema(summary="One invocation with its log lines", responses=s.InvocationDetailSerializer)
    def get(self, request, tenant_slug, function_name, invocation_id):
        function = function_or_404(request, tenant_slug, function_name)
        invocation = (selectors.invocations_for_function(function).prefetch_related("logs")
                      .filter(pk=invocation_id).first())
        if invocation is None:
            raise NotFound("Invocation not found.")
        return Response(s.InvocationDetailSerializer(invocation).data)
