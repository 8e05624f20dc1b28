"""Run every benchmark of the local engine and print the figures (`make bench`)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import cold_start, deploy, warm_overhead  # noqa: E402
from bench.common import setup_portal  # noqa: E402


def main() -> None:
    trials = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    user, tenant = setup_portal()
    cold_start.main(user, tenant, trials=trials)
    warm_overhead.main(user, tenant)
    deploy.main(user, tenant)


if __name__ == "__main__":
    main()
