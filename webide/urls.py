"""The IDE's pages: /ide/<tenant>/<function>/ and its upload endpoint."""

from django.urls import path

from webide import views

app_name = "webide"

urlpatterns = [
    path("ide/<slug:tenant>/<slug:function>/", views.editor, name="editor"),
    path("ide/<slug:tenant>/<slug:function>/upload/", views.upload, name="upload"),
]
