"""The tenant's Sequences pages: the list with search and a create form, and one sequence with its
steps, a Run form, its runs step by step (linked to the run's trace and each step's logs) and deletion."""

import json
import re
from dataclasses import dataclass, field

from django import forms
from django.contrib import messages
from django.core.paginator import Paginator
from django.shortcuts import redirect, render
from django.urls import reverse

from functions import services_triggers as services
from functions.models import Delivery, trigger_name_validator
from functions.selectors import (
    deliveries_of_runs,
    delivery_results,
    functions_for_user,
    sequence_for_tenant,
    sequence_runs,
    sequences_for_tenant,
    sequences_last_run_ids,
)
from portal.errors import NimbusError, PermissionDenied
from portal.views import refusal_on
from tenancy.forms import BootstrapForm
from tenancy.selectors import user_can_tenant
from tenancy.views import tenant_context, tenant_page

SEQUENCES_PAGE_SIZE = 25
RUNS_PAGE_SIZE = 10
# The tenant right the sequence services check for create, run and delete.
MANAGE = "create_function"


# The forms live beside their only views (functions/forms.py belongs to the function pages).

class SequenceFilterForm(BootstrapForm):
    q = forms.CharField(required=False, label="Search", max_length=40,
                        widget=forms.TextInput(attrs={"type": "search", "placeholder": "Sequence name"}))


class SequenceCreateForm(BootstrapForm):
    name = forms.CharField(max_length=40, validators=[trigger_name_validator],
                           widget=forms.TextInput(attrs={"placeholder": "order-pipeline", "autocomplete": "off"}))
    description = forms.CharField(max_length=500, required=False,
                                  widget=forms.TextInput(attrs={"placeholder": "What it does (optional)"}))
    functions = forms.CharField(
        label="Steps", max_length=2000,
        help_text="Function names in the order they run, separated by commas or new lines. "
                  "Each one's output is the next one's input.",
        widget=forms.TextInput(attrs={"placeholder": "validate, enrich, store", "autocomplete": "off",
                                      "list": "tenant-function-names"}))

    def clean_functions(self) -> list[str]:
        # Which names exist (and how many steps are allowed) is the service's to say.
        return [name for name in re.split(r"[\s,]+", self.cleaned_data["functions"]) if name]

    def style_widgets(self):
        super().style_widgets()
        self.fields["functions"].widget.attrs["class"] += " mono"


class SequenceRunForm(BootstrapForm):
    input = forms.CharField(
        required=False, label="Input (JSON)", max_length=256 * 1024, strip=True,
        help_text="The first step's request body. Leave empty to start without a body.",
        widget=forms.Textarea(attrs={"rows": 4, "spellcheck": "false", "placeholder": '{"n": 3}'}))

    def clean_input(self) -> bytes:
        text = self.cleaned_data["input"]
        if not text:
            return b""
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise forms.ValidationError(f"This is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno}).")
        except RecursionError:
            raise forms.ValidationError("This JSON is nested too deeply.") from None
        return json.dumps(value).encode()

    def style_widgets(self):
        super().style_widgets()
        self.fields["input"].widget.attrs["class"] += " mono"


# ---- runs -----------------------------------------------------------------------------------------------

@dataclass
class Run:
    """One run of a sequence: every step of the sequence with the delivery that ran it, if reached."""

    run_id: object
    started: object
    steps: list = field(default_factory=list)  # [(SequenceStep, Delivery | None)]
    output: str = ""  # the last step's answer once the run succeeded (pretty JSON when it is JSON)

    @property
    def deliveries(self) -> list[Delivery]:
        return [d for _, d in self.steps if d is not None]

    @property
    def state(self) -> str:
        reached = self.deliveries
        states = {d.state for d in reached}
        if Delivery.State.DEAD in states:
            return "failed"
        if Delivery.State.DISCARDED in states:
            return "discarded"
        if self.steps and self.steps[-1][1] is not None and self.steps[-1][1].state == Delivery.State.SUCCEEDED:
            return "succeeded"
        if Delivery.State.RUNNING in states or (reached and states == {Delivery.State.SUCCEEDED}):
            return "running"  # a step runs, or the next one is about to be queued
        if any(d.state == Delivery.State.PENDING and d.attempts for d in reached):
            return "retrying"
        return "pending"

    @property
    def badge(self) -> str:
        """The Bootstrap badge class of the run's state."""
        return {"succeeded": "text-bg-success", "failed": "text-bg-danger", "discarded": "text-bg-secondary",
                "running": "text-bg-info", "retrying": "text-bg-warning"}.get(self.state, "text-bg-light border")

    @property
    def active(self) -> bool:
        return self.state in ("pending", "running", "retrying")

    @property
    def trace_id(self) -> str:
        first = self.deliveries[0] if self.deliveries else None
        return first.trace_id if first else ""

    @property
    def has_run(self) -> bool:
        """Whether any step reached an instance (before that the trace has no spans to show)."""
        return any(d.invocation_id or d.attempts for d in self.deliveries)


def _runs(tenant, sequence_steps: dict[int, list], rows: list[dict]) -> list[Run]:
    """Runs for ``rows`` (``{"run_id", "started", "sequence_id"}``) with their steps, in one query."""
    by_run: dict = {}
    for delivery in deliveries_of_runs(tenant, [r["run_id"] for r in rows]):
        by_run.setdefault(delivery.run_id, {})[delivery.step] = delivery
    runs = []
    for row in rows:
        reached = by_run.get(row["run_id"], {})
        steps = [(step, reached.get(step.position)) for step in sequence_steps.get(row["sequence_id"], [])]
        started = row.get("started") or min((d.created_at for d in reached.values()), default=None)
        runs.append(Run(run_id=row["run_id"], started=started, steps=steps))
    return runs


OUTPUT_CHARS = 4000


def _show_output(body) -> str:
    text = bytes(body or b"").decode("utf-8", "replace")
    try:
        text = json.dumps(json.loads(text), indent=2, ensure_ascii=False)
    except (ValueError, RecursionError):  # a function's output: shown as it came when it cannot be indented
        pass
    return text if len(text) <= OUTPUT_CHARS else text[:OUTPUT_CHARS] + "\n… (cut)"


def _with_outputs(tenant, runs: list[Run], visible: set[int]) -> None:
    """Give each succeeded run its output, read in one query — only where the user may see the last
    step's function (its answer is that function's data, like its logs)."""
    last = {run.steps[-1][1].pk: run for run in runs
            if run.state == "succeeded" and run.steps[-1][0].function_id in visible}
    for pk, body in delivery_results(tenant, last).items():
        last[pk].output = _show_output(body)


def _can_manage(request, tenant) -> bool:
    return user_can_tenant(request.user, tenant, MANAGE)


def _require_manage(request, tenant) -> None:
    # The services refuse too; checking first keeps a viewer's invalid form a 403, not a form error.
    if not _can_manage(request, tenant):
        raise PermissionDenied("You may not manage sequences in this tenant.")


# ---- the list -------------------------------------------------------------------------------------------

@tenant_page
def sequence_list(request, tenant):
    create_form = SequenceCreateForm(request.POST or None)
    if request.method == "POST":
        _require_manage(request, tenant)
        if create_form.is_valid():
            data = create_form.cleaned_data
            with refusal_on(create_form):
                sequence = services.sequence_create(acting_user=request.user, tenant=tenant, name=data["name"],
                                                    functions=data["functions"], description=data["description"])
                messages.success(request, f"Sequence {sequence.name} created with {len(data['functions'])} steps.")
                return redirect("tenant_sequence", tenant=tenant.slug, name=sequence.name)
    filters = SequenceFilterForm(request.GET or None)
    sequences = sequences_for_tenant(request.user, tenant).select_related("created_by").order_by("name")
    query = filters.cleaned_data["q"].strip() if filters.is_valid() else ""
    if query:
        sequences = sequences.filter(name__icontains=query)
    page = Paginator(sequences, SEQUENCES_PAGE_SIZE).get_page(request.GET.get("page"))
    page_sequences = list(page.object_list)
    last = sequences_last_run_ids(page_sequences)
    runs = _runs(tenant, {s.pk: list(s.steps.all()) for s in page_sequences},
                 [{"run_id": run_id, "sequence_id": pk} for pk, run_id in last.items()])
    last_runs = {run.run_id: run for run in runs}
    functions = list(functions_for_user(request.user, tenant=tenant).order_by("name").values_list("pk", "name"))
    rows = [{"sequence": s, "steps": list(s.steps.all()), "last_run": last_runs.get(last.get(s.pk))}
            for s in page_sequences]
    # The datalist of the create form offers the functions the user sees (the service accepts no others).
    names = [name for _, name in functions] if _can_manage(request, tenant) else []
    return render(request, "functions/sequences.html", tenant_context(
        request.user, tenant, "sequences", page=page, rows=rows, filters=filters, query=query,
        create_form=create_form, function_names=names, visible_functions={pk for pk, _ in functions}))


# ---- one sequence ---------------------------------------------------------------------------------------

@tenant_page
def sequence_detail(request, tenant, name):
    sequence = sequence_for_tenant(request.user, tenant, name)
    run_form = SequenceRunForm(request.POST or None, initial={"input": "{}"})
    if request.method == "POST":
        _require_manage(request, tenant)
        if run_form.is_valid():
            with refusal_on(run_form):
                delivery = services.sequence_start(acting_user=request.user, sequence=sequence,
                                                   body=run_form.cleaned_data["input"])
                messages.success(request, f"Run {delivery.run_id} queued; its steps appear below as they run.")
                return redirect("tenant_sequence", tenant=tenant.slug, name=sequence.name)
    steps = list(sequence.steps.all())
    page = Paginator(sequence_runs(sequence), RUNS_PAGE_SIZE).get_page(request.GET.get("page"))
    runs = _runs(tenant, {sequence.pk: steps}, [{**row, "sequence_id": sequence.pk} for row in page.object_list])
    visible = set(functions_for_user(request.user, tenant=tenant).values_list("pk", flat=True))
    _with_outputs(tenant, runs, visible)
    return render(request, "functions/sequence.html", tenant_context(
        request.user, tenant, "sequences", sequence=sequence, steps=steps, page=page, runs=runs,
        run_form=run_form, can_manage=_can_manage(request, tenant), visible_functions=visible,
        polling=any(run.active for run in runs)))


@tenant_page
def sequence_delete_view(request, tenant, name):
    sequence = sequence_for_tenant(request.user, tenant, name)
    _require_manage(request, tenant)
    if request.method != "POST":
        return render(request, "confirm.html", tenant_context(
            request.user, tenant, "sequences", title=f"Delete sequence {sequence.name}?",
            body="It can no longer be run, and this page with the history of its runs goes away. "
                 "Its functions stay. A run in progress finishes its current step and stops there.",
            confirm_label="Delete sequence",
            cancel_url=reverse("tenant_sequence", kwargs={"tenant": tenant.slug, "name": sequence.name})))
    try:
        services.sequence_delete(acting_user=request.user, sequence=sequence)
    except PermissionDenied:
        raise
    except NimbusError as exc:
        messages.error(request, exc.message)
        return redirect("tenant_sequence", tenant=tenant.slug, name=sequence.name)
    messages.success(request, f"Sequence {name} deleted.")
    return redirect("tenant_sequences", tenant=tenant.slug)

