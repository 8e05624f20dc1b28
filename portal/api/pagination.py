"""Page-number pagination shared by every list endpoint of the API.

DRF quietly falls back to the default for a page size it cannot read (``page_size=null``, ``-1``)
and cuts a huge one down; here both are refused, as is a page that is not a number (or ``last``), so a client
learns its request was wrong instead of reading a page it did not ask for. A page past the last
one stays a 404, as in DRF.
"""

from rest_framework.pagination import PageNumberPagination

from portal.api.inputs import query_positive_int


class StandardPagination(PageNumberPagination):
    page_size = 50
    page_size_query_param = "page_size"
    max_page_size = 500

    def get_page_size(self, request):
        return query_positive_int(request, self.page_size_query_param, default=self.page_size,
                                  maximum=self.max_page_size)

    def get_page_number(self, request, paginator):
        if request.query_params.get(self.page_query_param) in self.last_page_strings:
            return paginator.num_pages  # ?page=last, as DRF reads it
        return query_positive_int(request, self.page_query_param, default=1)

    def get_schema_operation_parameters(self, view):
        parameters = super().get_schema_operation_parameters(view)
        for parameter in parameters:
            parameter["schema"]["minimum"] = 1
            if parameter["name"] == self.page_size_query_param:
                parameter["schema"]["maximum"] = self.max_page_size
                parameter["description"] = f"Number of results per page (default {self.page_size}, at most " \
                                           f"{self.max_page_size})."
        return parameters
