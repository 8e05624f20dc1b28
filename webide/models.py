"""What the IDE keeps per function besides its source: saved test events for the test panel."""

from django.conf import settings
from django.db import models
from django.utils import timezone

from functions.models import Function


class TestEvent(models.Model):
    """A named request the test panel can send to the function again (Lambda's saved test events)."""

    class Method(models.TextChoices):
        GET = "GET", "GET"
        POST = "POST", "POST"
        PUT = "PUT", "PUT"
        PATCH = "PATCH", "PATCH"
        DELETE = "DELETE", "DELETE"
        HEAD = "HEAD", "HEAD"
        OPTIONS = "OPTIONS", "OPTIONS"

    # Not a test class, whatever pytest's name-based collection thinks.
    __test__ = False

    function = models.ForeignKey(Function, on_delete=models.CASCADE, related_name="test_events")
    name = models.CharField(max_length=100)
    method = models.CharField(max_length=8, choices=Method.choices, default=Method.GET)
    path = models.CharField(max_length=500, blank=True)
    query = models.CharField(max_length=2000, blank=True)
    headers = models.JSONField(default=dict, blank=True)
    body = models.TextField(blank=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                   related_name="+")
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["function", "name"]
        constraints = [models.UniqueConstraint(fields=["function", "name"], name="testevent_unique_name")]

    def __str__(self):
        return f"{self.function}: {self.name}"

    def as_dict(self) -> dict:
        return {"id": self.pk, "name": self.name, "method": self.method, "path": self.path, "query": self.query,
                "headers": self.headers, "body": self.body}
