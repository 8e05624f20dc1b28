"""Forms of the tenant pages. They only shape input; the services decide what is allowed."""

from datetime import timedelta

from django import forms
from django.utils import timezone

from tenancy.models import ApiToken, Role, slug_validator


class BootstrapForm(forms.Form):
    """Gives each widget the Bootstrap class its kind needs, so templates can render ``{{ field }}``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.style_widgets()

    def style_widgets(self):
        for field in self.fields.values():
            widget = field.widget
            if isinstance(widget, (forms.CheckboxInput, forms.CheckboxSelectMultiple)):
                css = "form-check-input"
            elif isinstance(widget, forms.Select):
                css = "form-select form-select-sm"
            else:
                css = "form-control form-control-sm"
            widget.attrs["class"] = css


class TenantCreateForm(BootstrapForm):
    slug = forms.CharField(max_length=30, validators=[slug_validator], label="Slug",
                           help_text="Lowercase letters, digits and hyphens; part of every invoke URL.",
                           widget=forms.TextInput(attrs={"placeholder": "acme", "autocomplete": "off"}))
    name = forms.CharField(max_length=100, label="Display name", required=False,
                           widget=forms.TextInput(attrs={"placeholder": "Acme Corp."}))


class MemberAddForm(BootstrapForm):
    username = forms.CharField(max_length=150, widget=forms.TextInput(attrs={"autocomplete": "off"}))
    role = forms.ChoiceField(choices=Role.choices, initial=Role.DEVELOPER)


class MemberFilterForm(BootstrapForm):
    q = forms.CharField(required=False, label="Search",
                        widget=forms.TextInput(attrs={"type": "search", "placeholder": "username"}))
    role = forms.ChoiceField(required=False, choices=[("", "Any role"), *Role.choices])


class MemberRoleForm(BootstrapForm):
    role = forms.ChoiceField(choices=Role.choices)


EXPIRY_CHOICES = [("30", "30 days"), ("90", "90 days"), ("365", "1 year"), ("never", "Never")]


class TokenCreateForm(BootstrapForm):
    name = forms.CharField(max_length=100, widget=forms.TextInput(attrs={"placeholder": "ci-deploy",
                                                                           "autocomplete": "off"}))
    scopes = forms.MultipleChoiceField(choices=ApiToken.Scope.choices, widget=forms.CheckboxSelectMultiple,
                                       initial=[ApiToken.Scope.READ])
    expires = forms.ChoiceField(choices=EXPIRY_CHOICES, initial="90", label="Expires in")

    def __init__(self, *args, allowed_scopes=None, **kwargs):
        """``allowed_scopes``: the scopes the user's role lets a token carry (the others are not offered;
        token_create refuses them anyway)."""
        super().__init__(*args, **kwargs)
        if allowed_scopes is not None:
            self.fields["scopes"].choices = [(v, label) for v, label in ApiToken.Scope.choices if v in allowed_scopes]

    def expires_at(self):
        value = self.cleaned_data["expires"]
        return None if value == "never" else timezone.now() + timedelta(days=int(value))


class AuditFilterForm(BootstrapForm):
    q = forms.CharField(required=False, label="Search",
                        widget=forms.TextInput(attrs={"placeholder": "target or action", "type": "search"}))
    action = forms.CharField(required=False, widget=forms.TextInput(attrs={"placeholder": "e.g. function.deploy"}))
    actor = forms.CharField(required=False, widget=forms.TextInput(attrs={"placeholder": "username"}))
