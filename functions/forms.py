"""Forms of the function pages. They only shape input; the services decide what is allowed."""

from django import forms

from functions.models import Function, Runtime, env_name_validator, function_name_validator
from functions.services import CONFIG_FIELDS
from functions.starters import starters_for
from tenancy.forms import BootstrapForm
from tenancy.permissions import SHARE_LEVELS


def starter_choices(runtime: str) -> list[tuple[str, str]]:
    return starters_for(runtime) or [("hello", "Hello world")]


class FunctionFilterForm(BootstrapForm):
    q = forms.CharField(required=False, label="Search",
                        widget=forms.TextInput(attrs={"type": "search", "placeholder": "Name or description"}))
    state = forms.ChoiceField(required=False, choices=[("", "Any state"), *Function.State.choices])
    runtime = forms.ChoiceField(required=False, choices=[("", "Any runtime"), *Runtime.choices])


class FunctionCreateForm(BootstrapForm):
    name = forms.CharField(max_length=40, validators=[function_name_validator],
                           widget=forms.TextInput(attrs={"placeholder": "hello-world", "autocomplete": "off"}))
    runtime = forms.ChoiceField(choices=Runtime.choices, initial=Runtime.PYTHON)
    starter = forms.ChoiceField(choices=[], initial="hello")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        runtime = self.data.get("runtime") if self.is_bound else None
        self.fields["starter"].choices = starter_choices(runtime if runtime in Runtime.values else Runtime.PYTHON)


class FunctionConfigForm(BootstrapForm):
    """The settings of function_update, with the model's own validators (a plain form, so the
    instance stays untouched until the service changes it)."""

    LABELS = {"memory_mb": "Memory (MB)", "cpu_millicores": "CPU (millicores)", "gpus": "GPUs",
              "timeout_seconds": "Timeout (seconds)", "invoke_auth": "Who may invoke",
              "allow_egress": "Allow network egress", "debug": "Debug mode"}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields.update(forms.fields_for_model(Function, fields=CONFIG_FIELDS, labels=self.LABELS))
        self.fields["description"].widget = forms.Textarea(attrs={"rows": 2})
        for name in ("allow_egress", "debug"):
            self.fields[name].required = False
        self.style_widgets()


class DeployForm(BootstrapForm):
    message = forms.CharField(max_length=200, required=False,
                              widget=forms.TextInput(attrs={"placeholder": "What changed (optional)"}))
    promote = forms.BooleanField(required=False, initial=True, label="Send all traffic to it once ready")


class EnvVarForm(BootstrapForm):
    name = forms.CharField(max_length=128, validators=[env_name_validator],
                           widget=forms.TextInput(attrs={"placeholder": "LOG_LEVEL", "autocomplete": "off"}))
    value = forms.CharField(required=False, max_length=32768,
                            widget=forms.TextInput(attrs={"autocomplete": "off"}))


class SecretForm(BootstrapForm):
    name = forms.CharField(max_length=128, validators=[env_name_validator],
                           widget=forms.TextInput(attrs={"placeholder": "API_KEY", "autocomplete": "off"}))
    value = forms.CharField(max_length=32768, widget=forms.PasswordInput(attrs={"autocomplete": "new-password"}))


class ShareForm(BootstrapForm):
    username = forms.CharField(max_length=150, widget=forms.TextInput(attrs={"autocomplete": "off"}))
    level = forms.ChoiceField(choices=[(level, level.capitalize()) for level in SHARE_LEVELS], initial="view")


class DeleteFunctionForm(BootstrapForm):
    confirm_name = forms.CharField(label="Type the function's name to confirm",
                                   widget=forms.TextInput(attrs={"autocomplete": "off", "autofocus": True}))

    def __init__(self, *args, function: Function, **kwargs):
        super().__init__(*args, **kwargs)
        self.function = function

    def clean_confirm_name(self):
        value = self.cleaned_data["confirm_name"].strip()
        if value != self.function.name:
            raise forms.ValidationError(f"Type {self.function.name} exactly to delete it.")
        return value
