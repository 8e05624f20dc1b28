"""Cold start: a Python hello from zero to its first response, p50/p99 over many trials, beside the
interpreter's own start (`python -S -c pass`, `python -c pass`) measured in the same run."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

from bench.common import create_and_deploy, gateway_request, summary, use_engine

HELLO = {"handler.py": "def handle(event, context):\n    return 'Hello, ' + event.query.get('name', 'world') + '!'\n"}
NODE_HELLO = {"handler.js": "module.exports.handle = async (event) => `Hello, ${event.query.name || 'world'}!`;\n"}


def interpreter_baseline(trials: int) -> dict[str, list[float]]:
    results = {}
    for label, argv in (("python -S -c pass", [sys.executable, "-S", "-c", "pass"]),
                        ("python -c pass", [sys.executable, "-c", "pass"])):
        samples = []
        for _ in range(trials):
            started = time.perf_counter()
            subprocess.run(argv, check=True)
            samples.append((time.perf_counter() - started) * 1000)
        results[label] = samples
    return results


def cold_starts(engine, function_path: str, revision_id: int, trials: int) -> tuple[list[float], list[float]]:
    """(end-to-end cold request ms, instance start ms) with the instance killed after every trial."""
    total, init = [], []

    async def run():
        for _ in range(trials):
            started = time.perf_counter()
            status, headers, _ = await gateway_request(function_path, "name=bench")
            elapsed = (time.perf_counter() - started) * 1000
            if status != 200 or headers.get("x-nimbus-cold-start") != "yes":
                raise RuntimeError(f"trial {len(total)}: expected a cold 200, got {status} {headers}")
            total.append(elapsed)
            pool = engine.pool_for(revision_id)
            for inst in list(pool.instances.values()):
                init.append(inst.init_ms)
                pool.kill(inst, "benchmark: back to zero")
            await asyncio.sleep(0.01)

    asyncio.run(run())
    return total, init


def main(user, tenant, trials: int = 100) -> dict:
    print(f"== cold start ({trials} trials each)")
    figures = {}
    for label, samples in interpreter_baseline(trials).items():
        print(f"  {label:38s} {summary(samples)}")
        figures[label] = samples
    for sandbox_mode in ("bwrap", "none"):
        from functions.engines.local.sandbox import bwrap_problem

        if sandbox_mode == "bwrap" and bwrap_problem():
            print("  (bubblewrap not usable here: sandboxed figures skipped)")
            continue
        engine = use_engine(sandbox_mode=sandbox_mode, idle_seconds=600)
        name = f"cold-{sandbox_mode}"
        _, revision = create_and_deploy(user, tenant, name, HELLO)
        total, init = cold_starts(engine, f"/fn/bench/{name}/", revision.pk, trials)
        print(f"  python zygote [{sandbox_mode:5s}] request      {summary(total)}")
        print(f"  python zygote [{sandbox_mode:5s}] fork→ready   {summary(init)}")
        figures[f"zygote-{sandbox_mode}"] = total
        engine.shutdown()
    engine = use_engine(idle_seconds=600, zygote=False)
    _, revision = create_and_deploy(user, tenant, "cold-nozygote", HELLO)
    total, _ = cold_starts(engine, "/fn/bench/cold-nozygote/", revision.pk, max(20, trials // 5))
    print(f"  python, no zygote [{engine.sandbox_mode}] request   {summary(total)}")
    _, revision = create_and_deploy(user, tenant, "cold-node", NODE_HELLO, runtime="node20")
    total, _ = cold_starts(engine, "/fn/bench/cold-node/", revision.pk, max(20, trials // 5))
    print(f"  node [{engine.sandbox_mode}] request                {summary(total)}")
    engine.shutdown()
    return figures


if __name__ == "__main__":
    from bench.common import setup_portal

    main(*setup_portal())
