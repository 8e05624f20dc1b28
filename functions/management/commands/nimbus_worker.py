"""``manage.py nimbus_worker``: drain the delivery queue and fire cron triggers in a process of
its own (any number of them may run beside the portal's in-process worker)."""

import signal

from django.core.management.base import BaseCommand

from functions.triggers.queue import DEFAULT_LEASE_SECONDS
from functions.triggers.worker import Worker


class Command(BaseCommand):
    help = "Deliver queued async calls, CloudEvents, cron runs and sequence steps to functions."

    def add_arguments(self, parser):
        parser.add_argument("--concurrency", type=int, default=8, help="Deliveries in flight at once.")
        parser.add_argument("--poll", type=float, default=0.25, help="Seconds between looks at an idle queue.")
        parser.add_argument("--lease", type=float, default=DEFAULT_LEASE_SECONDS,
                            help="Seconds a claimed delivery stays this worker's without renewal.")
        parser.add_argument("--no-cron", action="store_true", help="Leave cron triggers to other workers.")
        parser.add_argument("--id", default=None, help="Worker id (shown in leases); default host-pid-random.")

    def handle(self, *args, **options):
        worker = Worker(worker_id=options["id"], concurrency=options["concurrency"], poll_seconds=options["poll"],
                        lease_seconds=options["lease"], cron_enabled=not options["no_cron"])

        def stop(signum, frame):
            worker.stopping.set()
            worker.wake()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        self.stdout.write(f"nimbus worker {worker.worker_id}: concurrency {worker.concurrency}, "
                          f"lease {worker.lease_seconds:g} s, cron {'on' if worker.cron_enabled else 'off'}")
        self.stdout.flush()
        worker.run()
        from functions.engines import get_engine

        engine = get_engine()
        if hasattr(engine, "shutdown"):
            engine.shutdown()
        self.stdout.write(f"nimbus worker {worker.worker_id}: stopped after {worker.processed} deliveries")
