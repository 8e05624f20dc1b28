"""The list endpoints' filter backends: django-filter, search and ordering, each refusing garbage
with a 400 naming the parameter instead of quietly showing an unfiltered or default-ordered list
(``ordering=unknown`` or ``status=`` would otherwise look like an answer to the question asked)."""

import django_filters
from django import forms
from django_filters.rest_framework import DjangoFilterBackend
from rest_framework import filters

from portal.api.inputs import OUT_OF_RANGE, in_utc, refuse_parameter


class StrictFilterBackend(DjangoFilterBackend):
    """django-filter refuses values it cannot read; an empty one it takes as "no filter". Empty is
    free text's own value, but for a choice, number, date or id it is no value at all: refused."""

    def filter_queryset(self, request, queryset, view):
        filterset = self.get_filterset(request, queryset, view)
        if filterset is not None:
            for name, declared in filterset.filters.items():
                if isinstance(declared, django_filters.CharFilter):
                    continue
                if name in request.query_params and request.query_params[name].strip() == "":
                    refuse_parameter(name, "An empty value is not a valid one: leave the parameter out instead.")
        return super().filter_queryset(request, queryset, view)


class StrictOrderingFilter(filters.OrderingFilter):
    def remove_invalid_fields(self, queryset, fields, view, request):
        valid = [item[0] for item in self.get_valid_fields(queryset, view, {"request": request})]
        unknown = [term for term in fields if term.removeprefix("-") not in valid]
        if unknown:
            refuse_parameter(self.ordering_param, f"Cannot order by {', '.join(unknown)}: use "
                                                  f"{', '.join(valid)} (with '-' in front for descending).")
        return fields


class WholeNumberField(forms.IntegerField):
    """Digits only: Django's IntegerField also takes "1.0" and " 1 ", which the schema's integer is not."""

    def to_python(self, value):
        if value not in self.empty_values and not (str(value).isascii() and str(value).isdigit()):
            raise forms.ValidationError("Enter a whole number (digits only).", code="invalid")
        return super().to_python(value)


class IntegerFilter(django_filters.NumberFilter):
    """A whole number (a revision number): 0.5 is refused, not looked up."""

    field_class = WholeNumberField


class UtcDateTimeField(django_filters.fields.IsoDateTimeField):
    def to_python(self, value):
        moment = super().to_python(value)
        if moment is not None and in_utc(moment) is None:
            raise forms.ValidationError(OUT_OF_RANGE, code="invalid")
        return in_utc(moment)


class DateTimeFilter(django_filters.IsoDateTimeFilter):
    """An ISO 8601 date-time, compared in UTC whatever offset it was given with."""

    field_class = UtcDateTimeField


# Every list endpoint's backends; a view that has no filterset, search or ordering fields simply
# gets nothing from the backend concerned.
FILTER_BACKENDS = [StrictFilterBackend, filters.SearchFilter, StrictOrderingFilter]
