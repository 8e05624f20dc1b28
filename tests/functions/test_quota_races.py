"""Tenant quotas hold under concurrent writes: every check and the write it guards run under the
tenant's row lock (tenancy.services.tenant_locked). Races run on PostgreSQL in real threads; the
refusal messages and the lock discipline are checked on every database."""

import pytest
from django.contrib.auth import get_user_model
from django.db import transaction
from django.db.models import F, Sum
from rest_framework.test import APIClient

from functions.models import Function
from functions.services import (
    _check_quota,
    function_bring_online,
    function_create,
    function_deploy,
    function_file_save,
    function_take_offline,
    function_update,
)
from portal.errors import QuotaExceeded
from tenancy.models import Tenant
from tenancy.services import quota_update, tenant_locked
from tests.races import race, run_together, unexpected

pytestmark = pytest.mark.django_db

User = get_user_model()


def make_functions(tenant, user, count: int, *, prefix: str = "fn", **config) -> list[Function]:
    config = {"memory_mb": 128, "max_instances": 1, **config}
    return [function_create(acting_user=user, tenant=tenant, name=f"{prefix}{i}", **config) for i in range(count)]


def reserved(tenant) -> dict:
    """What the quota counts: memory × max instances and GPUs × max instances of functions not offline."""
    return (Function.objects.filter(tenant=tenant).exclude(state=Function.State.OFFLINE)
            .aggregate(memory=Sum(F("memory_mb") * F("max_instances")), gpus=Sum(F("gpus") * F("max_instances"))))


def fresh(user):
    """The user as a request in another thread would load it (no shared caches between threads)."""
    return User.objects.get(pk=user.pk)


# ---- races (PostgreSQL, real threads) -------------------------------------------------------

@race
def test_concurrent_memory_patches_never_exceed_the_memory_quota(tenant, members, operator):
    dev = members["developer"]
    functions = make_functions(tenant, dev, 8)  # 8 × 128 MB = 1,024 MB reserved
    quota_update(acting_user=operator, tenant=tenant, max_total_memory_mb=2048)

    def patch(name):
        def call():
            client = APIClient()
            client.force_authenticate(fresh(dev))
            return client.patch(f"/api/v1/tenants/acme/functions/{name}/", {"memory_mb": 1024}, format="json")
        return call

    # Each PATCH alone fits (1,024 + 7 × 128 = 1,920 MB); any two together do not.
    outcomes = run_together(*(patch(f.name) for f in functions))
    assert not unexpected(outcomes)
    statuses = [o.result.status_code for o in outcomes]
    assert sorted(statuses) == [200] + [403] * 7, statuses
    for outcome in outcomes:
        if outcome.result.status_code == 403:
            assert outcome.result.json()["code"] == "quota_exceeded"
            assert outcome.result.json()["field"] == "memory_mb"
    assert reserved(tenant)["memory"] == 1024 + 7 * 128 <= 2048
    assert Function.objects.filter(tenant=tenant, memory_mb=1024).count() == 1


@race
def test_concurrent_creates_never_exceed_the_function_count(tenant, members, operator):
    dev = members["developer"]
    make_functions(tenant, dev, 1)
    quota_update(acting_user=operator, tenant=tenant, max_functions=3)
    outcomes = run_together(*(
        (lambda i=i: function_create(acting_user=fresh(dev), tenant=Tenant.objects.get(pk=tenant.pk), name=f"new{i}"))
        for i in range(8)))
    assert not unexpected(outcomes, QuotaExceeded)
    assert sum(o.ok for o in outcomes) == 2
    assert {str(o.error) for o in outcomes if not o.ok} == {"Tenant acme has reached its limit of 3 functions."}
    assert Function.objects.filter(tenant=tenant).count() == 3


@race
def test_concurrent_creates_and_updates_share_one_memory_reservation(tenant, members, operator):
    dev = members["developer"]
    functions = make_functions(tenant, dev, 4)  # 512 MB
    quota_update(acting_user=operator, tenant=tenant, max_total_memory_mb=2048)
    updates = [lambda f=f: function_update(acting_user=fresh(dev), function=Function.objects.get(pk=f.pk),
                                           memory_mb=768) for f in functions]
    creates = [lambda i=i: function_create(acting_user=fresh(dev), tenant=Tenant.objects.get(pk=tenant.pk),
                                           name=f"big{i}", memory_mb=768, max_instances=1) for i in range(4)]
    outcomes = run_together(*updates, *creates)
    assert not unexpected(outcomes, QuotaExceeded)
    assert all(o.error.field == "memory_mb" for o in outcomes if not o.ok)
    succeeded = sum(o.ok for o in outcomes)
    assert succeeded == 2  # 512 + 640 or 768 for the first, then one more fits, never a third
    assert reserved(tenant)["memory"] <= 2048


@race
def test_concurrent_gpu_requests_never_exceed_the_gpu_quota(tenant, members, operator):
    dev = members["developer"]
    functions = make_functions(tenant, dev, 6)
    quota_update(acting_user=operator, tenant=tenant, max_gpus=2)
    outcomes = run_together(*(
        (lambda f=f: function_update(acting_user=fresh(dev), function=Function.objects.get(pk=f.pk), gpus=1))
        for f in functions))
    assert not unexpected(outcomes, QuotaExceeded)
    assert sum(o.ok for o in outcomes) == 2
    assert all(o.error.field == "gpus" for o in outcomes if not o.ok)
    assert reserved(tenant)["gpus"] == 2


@race
def test_concurrent_bring_online_never_exceeds_the_memory_quota(tenant, members, operator, engine):
    dev = members["developer"]
    make_functions(tenant, dev, 1, prefix="base")  # 128 MB stays online
    parked = make_functions(tenant, dev, 4, prefix="parked", memory_mb=1024)
    for function in parked:
        function_take_offline(acting_user=dev, function=function)
    quota_update(acting_user=operator, tenant=tenant, max_total_memory_mb=2048)
    outcomes = run_together(*(
        (lambda f=f: function_bring_online(acting_user=fresh(dev), function=Function.objects.get(pk=f.pk)))
        for f in parked))
    assert not unexpected(outcomes, QuotaExceeded)
    assert sum(o.ok for o in outcomes) == 1
    assert reserved(tenant)["memory"] == 128 + 1024
    assert Function.objects.filter(tenant=tenant, state=Function.State.OFFLINE).count() == 3


@race
@pytest.mark.parametrize("round_", range(5))
def test_two_settings_of_one_function_raced_stay_within_quota_and_neither_is_lost(tenant, members, operator,
                                                                                   round_):
    dev = members["developer"]
    (function,) = make_functions(tenant, dev, 1)
    quota_update(acting_user=operator, tenant=tenant, max_total_memory_mb=2048)
    # 1,024 MB × 1 fits, 128 MB × 4 fits, 1,024 MB × 4 does not.
    outcomes = run_together(
        lambda: function_update(acting_user=fresh(dev), function=Function.objects.get(pk=function.pk), memory_mb=1024),
        lambda: function_update(acting_user=fresh(dev), function=Function.objects.get(pk=function.pk), max_instances=4))
    assert not unexpected(outcomes, QuotaExceeded)
    assert [o.ok for o in outcomes].count(True) == 1
    function.refresh_from_db()
    assert function.memory_mb * function.max_instances <= 2048
    # The change that was accepted is in the row: the refused one did not overwrite it.
    assert (function.memory_mb, function.max_instances) == ((1024, 1) if outcomes[0].ok else (128, 4))


# ---- refusals, one by one (every database) --------------------------------------------------

def test_each_quota_refusal_names_the_limit(tenant, members, operator):
    dev = members["developer"]
    (function,) = make_functions(tenant, dev, 1)
    quota_update(acting_user=operator, tenant=tenant, max_functions=1, max_memory_mb_per_function=1024,
                 max_instances_per_function=3, max_total_memory_mb=2048, max_gpus=1)
    cases = [
        (lambda: function_create(acting_user=dev, tenant=tenant, name="two"),
         None, "Tenant acme has reached its limit of 1 functions."),
        (lambda: function_update(acting_user=dev, function=function, memory_mb=1536),
         "memory_mb", "Memory 1536 MB exceeds the tenant's limit of 1024 MB per function."),
        (lambda: function_update(acting_user=dev, function=function, max_instances=4),
         "max_instances", "Max instances 4 exceeds the tenant's limit of 3."),
        (lambda: function_update(acting_user=dev, function=function, memory_mb=1024, max_instances=3),
         "memory_mb", "This would reserve 3,072 MB in the tenant (memory × max instances over its functions); "
                      "the quota is 2,048 MB."),
        (lambda: function_update(acting_user=dev, function=function, gpus=1, max_instances=2),
         "gpus", "This would use 2 GPUs in the tenant; the quota is 1."),
    ]
    for call, field, message in cases:
        with pytest.raises(QuotaExceeded) as err:
            call()
        assert (err.value.field, err.value.message) == (field, message)
    function.refresh_from_db()
    assert (function.memory_mb, function.max_instances, function.gpus) == (128, 1, 0)


def test_bringing_online_and_deploying_are_checked_against_the_quota_as_it_is_now(tenant, members, operator,
                                                                                   engine):
    dev = members["developer"]
    (function,) = make_functions(tenant, dev, 1, memory_mb=1024)
    function_take_offline(acting_user=dev, function=function)
    make_functions(tenant, dev, 1, prefix="other", memory_mb=1024)
    quota_update(acting_user=operator, tenant=tenant, max_total_memory_mb=1536)
    with pytest.raises(QuotaExceeded) as err:
        function_bring_online(acting_user=dev, function=function)
    assert err.value.message.startswith("This would reserve 2,048 MB in the tenant")
    assert Function.objects.get(pk=function.pk).state == Function.State.OFFLINE
    # The quota lowered under a function's settings: its next deploy is refused.
    other = Function.objects.get(name="other0")
    quota_update(acting_user=operator, tenant=tenant, max_memory_mb_per_function=512)
    with pytest.raises(QuotaExceeded) as err:
        function_deploy(acting_user=dev, function=other)
    assert err.value.message == "Memory 1024 MB exceeds the tenant's limit of 512 MB per function."
    assert not other.revisions.exists()


def test_a_quota_check_outside_the_tenant_lock_is_a_programming_error(tenant, members):
    (function,) = make_functions(tenant, members["developer"], 1)
    with pytest.raises(RuntimeError, match="tenant_locked"):
        _check_quota(tenant, function)
    with transaction.atomic(), pytest.raises(RuntimeError, match="tenant_locked"):
        _check_quota(Tenant.objects.select_for_update().get(pk=tenant.pk), function)
    with tenant_locked(tenant) as locked:
        _check_quota(locked, function)
    # The lock is released with its block: a later check outside it is refused again.
    with pytest.raises(RuntimeError):
        _check_quota(locked, function)


def test_a_settings_update_from_a_stale_copy_writes_only_its_own_fields(tenant, members):
    dev = members["developer"]
    (function,) = make_functions(tenant, dev, 1)
    stale = Function.objects.get(pk=function.pk)
    function_file_save(acting_user=dev, function=function, path="extra.py", content="X = 1\n", base_version=1)
    function_update(acting_user=dev, function=function, description="saved meanwhile")
    function_update(acting_user=dev, function=stale, memory_mb=512)
    row = Function.objects.get(pk=function.pk)
    assert (row.memory_mb, row.source_version, row.description) == (512, 2, "saved meanwhile")
    # The caller's copy shows the settings as saved.
    assert (stale.memory_mb, stale.description) == (512, "saved meanwhile")


def test_a_deploy_finishing_after_the_function_went_offline_leaves_it_offline(tenant, members, engine,
                                                                             django_capture_on_commit_callbacks):
    dev = members["developer"]
    (function,) = make_functions(tenant, dev, 1)
    with django_capture_on_commit_callbacks(execute=False) as deploys:
        function_deploy(acting_user=dev, function=function)
    function_take_offline(acting_user=dev, function=function)
    for run in deploys:
        run()
    # Still counted out of the reservation: coming back online goes through the quota check.
    assert Function.objects.get(pk=function.pk).state == Function.State.OFFLINE
