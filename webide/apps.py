from django.apps import AppConfig


class WebideConfig(AppConfig):
    name = "webide"
    default_auto_field = "django.db.models.BigAutoField"
