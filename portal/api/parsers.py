"""The API's JSON parser: DRF's, with JSON nested deeper than Python can decode refused as a parse
error (400 in the usual error shape) instead of escaping as a RecursionError (a 500)."""

from rest_framework import parsers
from rest_framework.exceptions import ParseError


class JSONParser(parsers.JSONParser):
    def parse(self, stream, media_type=None, parser_context=None):
        try:
            return super().parse(stream, media_type, parser_context)
        except RecursionError:
            raise ParseError("JSON parse error - the document is nested too deeply.") from None
