"""The log search form (page and API share its validation)."""

from django import forms

from observability.selectors import LEVELS, LogQuery


class LogSearchForm(forms.Form):
    q = forms.CharField(required=False, max_length=200, label="Text")
    level = forms.ChoiceField(required=False, choices=[("", "Any level"), *[(lv, f"{lv} and above") for lv in LEVELS]])
    revision = forms.IntegerField(required=False, min_value=1, label="Revision")
    invocation = forms.UUIDField(required=False, label="Invocation id")
    since = forms.DateTimeField(required=False, label="From", widget=forms.DateTimeInput(attrs={"type": "datetime-local"}))
    until = forms.DateTimeField(required=False, label="To", widget=forms.DateTimeInput(attrs={"type": "datetime-local"}))

    def query(self) -> LogQuery:
        data = self.cleaned_data if self.is_bound and self.is_valid() else {}
        return LogQuery(since=data.get("since"), until=data.get("until"), revision=data.get("revision"),
                        invocation=str(data["invocation"]) if data.get("invocation") else "",
                        level=data.get("level") or "", text=data.get("q") or "")
