"""The log search form (page and API share its validation)."""

from django import forms

from observability.selectors import LEVELS, LogQuery
from portal.api.inputs import OUT_OF_RANGE, in_utc


class LogSearchForm(forms.Form):
    q = forms.CharField(required=False, max_length=200, label="Text")
    level = forms.ChoiceField(required=False, choices=[("", "Any level"), *[(lv, f"{lv} and above") for lv in LEVELS]])
    revision = forms.IntegerField(required=False, min_value=1, label="Revision")
    invocation = forms.UUIDField(required=False, label="Invocation id")
    since = forms.DateTimeField(required=False, label="From", widget=forms.DateTimeInput(attrs={"type": "datetime-local"}))
    until = forms.DateTimeField(required=False, label="To", widget=forms.DateTimeInput(attrs={"type": "datetime-local"}))

    def clean_since(self):
        return self._in_utc("since")

    def clean_until(self):
        return self._in_utc("until")

    def _in_utc(self, name: str):
        # Compared in UTC: an ISO 8601 offset may go beyond what PostgreSQL takes (±15:59).
        moment = self.cleaned_data.get(name)
        utc = in_utc(moment)
        if moment is not None and utc is None:
            raise forms.ValidationError(OUT_OF_RANGE)
        return utc

    def query(self) -> LogQuery:
        data = self.cleaned_data if self.is_bound and self.is_valid() else {}
        return LogQuery(since=data.get("since"), until=data.get("until"), revision=data.get("revision"),
                        invocation=str(data["invocation"]) if data.get("invocation") else "",
                        level=data.get("level") or "", text=data.get("q") or "")
