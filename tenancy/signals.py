"""An account turned off anywhere (the operators' service, Django's admin, a script's ``user.save()``)
loses its access in every process at once: the access generation goes up, so the gateway's cached
tokens are looked up again (and refused), and the user's open IDE sockets are closed.

Only saves go through here: ``QuerySet.update(is_active=False)`` sends no signal. Its tokens and
sessions are still refused on their next lookup (``token_authenticate`` and the session middleware
read ``is_active``), and an open editor re-reads the account on every action (webide/consumers.py).
"""

from django.contrib.auth import get_user_model
from django.db.models.signals import post_save, pre_save

from tenancy.revocation import access_changed

User = get_user_model()

DEACTIVATED = "your account was deactivated"


def _remember_deactivation(sender, instance, raw=False, update_fields=None, **kwargs):
    """Before a save: whether it turns ``is_active`` from True to False, as the database has it now."""
    instance._nimbus_deactivating = (
        not raw and instance.pk is not None and not instance.is_active
        and (update_fields is None or "is_active" in update_fields)
        and sender._default_manager.filter(pk=instance.pk, is_active=True).exists())


def _announce_deactivation(sender, instance, created=False, raw=False, **kwargs):
    if not getattr(instance, "_nimbus_deactivating", False):
        return
    instance._nimbus_deactivating = False
    from tenancy.models import Membership, Tenant

    # Their IDE sockets are in the tenants they belong to; an operator's may be in any tenant.
    tenants = Tenant.objects.all() if instance.is_superuser else Tenant.objects.filter(
        pk__in=Membership.objects.filter(user=instance).values("tenant_id"))
    access_changed(reason=DEACTIVATED, tenant_ids=tenants.values_list("pk", flat=True), user_ids=[instance.pk],
                   close_sockets=True)


def connect() -> None:
    pre_save.connect(_remember_deactivation, sender=User, dispatch_uid="tenancy.remember_deactivation")
    post_save.connect(_announce_deactivation, sender=User, dispatch_uid="tenancy.announce_deactivation")
