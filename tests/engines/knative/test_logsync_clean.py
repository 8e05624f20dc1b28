"""Log lines pulled from Knative pods that PostgreSQL cannot store as they are (a NUL, a lone
surrogate) are stored cleaned, once: what is stored is what the next pass de-duplicates against."""

from datetime import timedelta

import pytest
from django.utils import timezone

from .test_logsync import NAMESPACE, hello, invocation, pod_labels, shim_line, stored  # noqa: F401 - fixture

pytestmark = pytest.mark.django_db(transaction=True)


def test_lines_with_a_nul_or_a_lone_surrogate_are_stored_cleaned_and_once(engine, stand_in, hello):  # noqa: F811
    row = invocation(hello)
    when = timezone.now() - timedelta(seconds=5)
    log = "\n".join([shim_line(when, "before\x00after", invocation=row.pk),
                     shim_line(when + timedelta(milliseconds=1), "broken \ud83d emoji", invocation=row.pk,
                               level="WARN\x00"),
                     shim_line(when + timedelta(milliseconds=2), "fine", invocation=row.pk)])
    stand_in.add_pod(NAMESPACE, "hello-00001-a", pod_labels("hello"), log=log)
    assert engine.pull_logs() == 3
    assert engine.pull_logs() == 0
    assert [(level, message) for _, level, message, _ in stored(hello)] == [
        ("INFO", "before\ufffdafter"), ("WARN\ufffd", "broken \ufffd emoji"), ("INFO", "fine")]
