"""Run callables at the same moment in real threads, each on its own database connection, for the
race tests on tenant-wide invariants (quotas, owners)."""

import threading
from dataclasses import dataclass

import pytest
from django.db import connection

# Row locks are what these tests exercise; SQLite has none (it serialises whole writers instead).
needs_postgresql = pytest.mark.skipif(
    connection.vendor != "postgresql",
    reason="races on row locks need PostgreSQL (SQLite serialises writers; CI runs PostgreSQL)")


def race(test):
    """Mark a race test: PostgreSQL only, committed transactions the threads can see."""
    return needs_postgresql(pytest.mark.django_db(transaction=True)(test))


@dataclass
class Outcome:
    result: object = None
    error: BaseException | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def run_together(*calls, timeout: float = 60) -> list[Outcome]:
    """Start every call at once (a barrier), wait for all, and return what each returned or raised,
    in the order given. Each thread closes its connection at the end, as a request would."""
    barrier = threading.Barrier(len(calls), timeout=timeout)
    outcomes = [Outcome() for _ in calls]

    def run(index: int, call) -> None:
        try:
            barrier.wait()
            outcomes[index].result = call()
        except BaseException as exc:  # noqa: BLE001 - the test decides which refusals are expected
            outcomes[index].error = exc
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(i, call), name=f"race-{i}") for i, call in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    assert not any(thread.is_alive() for thread in threads), "a racing thread did not finish (deadlock?)"
    return outcomes


def unexpected(outcomes: list[Outcome], *allowed: type[BaseException]) -> list[BaseException]:
    """The errors that are not one of the expected refusals (to show in a failed assertion)."""
    return [o.error for o in outcomes if o.error is not None and not isinstance(o.error, allowed)]
