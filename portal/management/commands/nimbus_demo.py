"""Create the demo: an operator account, a "demo" tenant with a member of each role, and sample
functions, the first ones deployed. Safe to run again: what exists is kept."""

import secrets

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand
from django.db import transaction

from functions.models import Function, Revision, Runtime
from functions.services import function_create, function_deploy, function_env_set
from tenancy.models import Membership, Role, Tenant
from tenancy.services import tenant_create, tenant_member_add

User = get_user_model()

SAMPLES = [
    # name, runtime, starter, description, deploy
    ("hello", Runtime.PYTHON, "hello", "Says hello: try ?name=you", True),
    ("prices", Runtime.PYTHON, "http-json", "Prices a basket of items posted as JSON", True),
    ("greet-node", Runtime.NODE, "hello", "Hello from Node.js", True),
    ("on-order", Runtime.PYTHON, "cloudevent", "Handles order CloudEvents", True),
    ("nightly-report", Runtime.PYTHON, "cron", "A scheduled job", True),
    ("receipt", Runtime.PYTHON, None, "Turns a priced basket into a receipt (step 2 of the checkout sequence)", True),
]

# Sources of the samples that no starter provides.
SOURCES = {
    "receipt": {"handler.py": """\
def handle(event, context):
    \"\"\"The second step of the demo's checkout sequence: the output of prices comes in as JSON.\"\"\"
    priced = event.json() or {}
    total = float(priced.get("total", 0))
    vat = round(total * 0.2, 2)
    context.logger.info("receipt for %s items", priced.get("items", 0))
    return {"items": priced.get("items", 0), "net": total, "vat": vat, "gross": round(total + vat, 2),
            "text": f"{priced.get('items', 0)} item(s): {total:.2f} + VAT {vat:.2f} = {total + vat:.2f}"}
"""},
}
# The demo's sequence: a basket priced, then turned into a receipt.
SEQUENCE = ("checkout", ["prices", "receipt"], "Prices a basket, then writes its receipt")


class Command(BaseCommand):
    help = "Create the demo operator, tenant, members and sample functions (idempotent)."

    def add_arguments(self, parser):
        parser.add_argument("--admin-username", default=None)
        parser.add_argument("--admin-password", default=None)
        parser.add_argument("--no-deploy", action="store_true", help="Create functions but do not deploy them.")

    def handle(self, *args, **options):
        import os

        username = options["admin_username"] or os.environ.get("NIMBUS_ADMIN_USERNAME", "admin")
        password = options["admin_password"] or os.environ.get("NIMBUS_ADMIN_PASSWORD")
        credentials_file = settings.NIMBUS_DATA_DIR / "demo-credentials.txt"
        saved = {}
        if credentials_file.exists():
            for line in credentials_file.read_text().splitlines():
                user, _, pw = line.partition(" ")
                saved[user] = pw
        lines = []

        def ensure_user(name: str, *, superuser: bool = False, pw: str | None = None) -> User:
            user = User.objects.filter(username=name).first()
            if user is None:
                pw = pw or saved.get(name) or secrets.token_urlsafe(9)
                if superuser:
                    user = User.objects.create_superuser(name, f"{name}@example.com", pw)
                else:
                    user = User.objects.create_user(name, f"{name}@example.com", pw)
                saved[name] = pw
            lines.append((name, saved.get(name, "(unchanged: set before this run)")))
            return user

        operator = ensure_user(username, superuser=True, pw=password)
        users = {role: ensure_user(f"demo-{role}") for role in Role.values}

        with transaction.atomic():
            tenant = Tenant.objects.filter(slug="demo").first()
            if tenant is None:
                tenant = tenant_create(acting_user=operator, slug="demo", name="Demo team", owner=users["owner"])
            for role, user in users.items():
                if not Membership.objects.filter(tenant=tenant, user=user).exists():
                    tenant_member_add(acting_user=operator, tenant=tenant, username=user.username, role=role)

        to_deploy = []
        for name, runtime, starter, description, deploy in SAMPLES:
            function = Function.objects.filter(tenant=tenant, name=name).first()
            if function is None:
                function = function_create(acting_user=users["developer"], tenant=tenant, name=name,
                                           runtime=runtime, starter=starter, files=SOURCES.get(name),
                                           description=description)
                if name == "hello":
                    function_env_set(acting_user=users["developer"], function=function, name="GREETING",
                                     value="Hello")
            if deploy and not Revision.objects.filter(function=function).exists():
                to_deploy.append(function)

        self._ensure_triggers(tenant, users["developer"], saved)
        self._ensure_sequence(tenant, users["developer"])

        credentials_file.parent.mkdir(parents=True, exist_ok=True)
        credentials_file.write_text("".join(f"{u} {p}\n" for u, p in saved.items()))
        credentials_file.chmod(0o600)

        if not options["no_deploy"]:
            for function in to_deploy:
                # Inline: this command exits when done, and the portal serves the revision after it.
                revision = function_deploy(acting_user=users["developer"], function=function,
                                           message="demo", promote=True, inline=True)
                revision.refresh_from_db()
                outcome = revision.status if not revision.status_message else f"{revision.status}: {revision.status_message}"
                self.stdout.write(f"deployed {function}: revision {revision.number} {outcome}")

        self.stdout.write(self.style.SUCCESS("Demo ready at " + settings.NIMBUS_PUBLIC_URL))
        if saved.get(EVENTS_TOKEN):
            self.stdout.write("Publish a CloudEvent to on-order:\n  " + demo_event_curl(saved[EVENTS_TOKEN]))
        self.stdout.write("Accounts (also in %s):" % credentials_file)
        for user, pw in lines:
            self.stdout.write(f"  {user:<16} {pw}")

    def _ensure_sequence(self, tenant, developer) -> None:
        from functions.models import Sequence
        from functions.services_triggers import sequence_create

        name, functions, description = SEQUENCE
        if not Sequence.objects.filter(tenant=tenant, name=name).exists():
            sequence_create(acting_user=developer, tenant=tenant, name=name, functions=functions,
                            description=description)

    def _ensure_triggers(self, tenant, developer, saved: dict) -> None:
        """nightly-report runs every minute; on-order takes com.example.order.created events, which a
        publish-scoped token (kept in the credentials file) can post to /events/demo/."""
        from functions.models import Trigger
        from functions.services_triggers import trigger_create
        from tenancy.models import ApiToken
        from tenancy.services import token_create, token_revoke

        wanted = [("nightly-report", "every-minute", {"kind": "cron", "schedule": "* * * * *", "time_zone": "UTC"}),
                  ("on-order", "orders", {"kind": "event", "filters": [
                      {"attribute": "type", "value": "com.example.order.created", "match": "exact"}]})]
        for function_name, trigger_name, options in wanted:
            function = Function.objects.get(tenant=tenant, name=function_name)
            if not Trigger.objects.filter(function=function, name=trigger_name).exists():
                trigger_create(acting_user=developer, function=function, name=trigger_name, **options)
        token = ApiToken.objects.filter(tenant=tenant, name="demo-events", revoked_at__isnull=True).first()
        if token is None or EVENTS_TOKEN not in saved:
            if token is not None:
                token_revoke(acting_user=developer, token=token)  # its plaintext is lost: issue a fresh one
            _, saved[EVENTS_TOKEN] = token_create(acting_user=developer, tenant=tenant, name="demo-events",
                                                  scopes=["publish"])


EVENTS_TOKEN = "publish-token"


def demo_event_curl(token: str) -> str:
    return (f"curl -i -X POST {settings.NIMBUS_PUBLIC_URL}/events/demo/ -H 'Authorization: Bearer {token}' "
            "-H 'ce-specversion: 1.0' -H 'ce-id: order-1' -H 'ce-source: /shop' "
            "-H 'ce-type: com.example.order.created' -H 'Content-Type: application/json' -d '{\"order\": 1}'")
