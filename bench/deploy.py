"""Deploy-to-first-200: from `function_deploy` (freeze, prepare, health, traffic) to the first
successful answer at the gateway, for new revisions of a Python function."""

from __future__ import annotations

import asyncio
import time

from bench.common import gateway_request, summary, use_engine


def main(user, tenant, trials: int = 10) -> list[float]:
    from functions.services import function_create, function_deploy, function_source_replace

    print(f"== deploy to first 200 ({trials} deploys)")
    engine = use_engine(idle_seconds=600)
    function = function_create(acting_user=user, tenant=tenant, name="deployed",
                               files={"handler.py": "def handle(event, context):\n    return 'v0'\n"})
    samples, deploy_only = [], []
    for n in range(1, trials + 1):
        version = function.source_version
        function_source_replace(acting_user=user, function=function, base_version=version,
                                files={"handler.py": f"def handle(event, context):\n    return 'v{n}'\n"})
        function.refresh_from_db()
        started = time.perf_counter()
        revision = function_deploy(acting_user=user, function=function)
        deployed = time.perf_counter()

        async def first_200():
            while True:
                status, _, body = await gateway_request("/fn/bench/deployed/")
                if status == 200 and body == f"v{n}".encode():
                    return
                await asyncio.sleep(0.005)

        asyncio.run(first_200())
        samples.append((time.perf_counter() - started) * 1000)
        deploy_only.append((deployed - started) * 1000)
        revision.refresh_from_db()
        assert revision.status == "ready", revision.status_message
    print(f"  function_deploy (inline)            {summary(deploy_only)}")
    print(f"  deploy → first 200                  {summary(samples)}")
    engine.shutdown()
    return samples


if __name__ == "__main__":
    from bench.common import setup_portal

    main(*setup_portal())
