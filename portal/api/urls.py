from django.urls import include, path, re_path

from portal.api.exceptions import endpoint_not_found

urlpatterns = [
    path("", include("tenancy.api.urls")),
    path("", include("functions.api.urls")),
    path("", include("observability.api.urls")),
    # Keep last: anything unmatched under /api/v1/ gets a JSON 404 instead of the HTML page.
    re_path(r"^", endpoint_not_found),
]
