"""``python -m node.check`` (``deploy/check``): run the workload and the checkers against a deployment.

It only talks to the URLs it is given, bounds its own load (one request in flight per client, an operation
cap, a duration), optionally stops and restarts one named container halfway (``--stop-container``), and drops
the table it created. Exit status: 0 every promise held, 1 a checker found a violation, 2 it could not run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

import aiohttp

from node.check import history, report
from node.check.workload import Client, Recorder, Workload, WorkloadConfig


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="deploy/check", description=__doc__.split("\n\n")[0])
    p.add_argument("urls", nargs="+", help="every node's base URL, e.g. http://localhost:3001")
    p.add_argument(
        "--token",
        default=os.environ.get("TN_TOKEN"),
        help="a write token (default: $TN_TOKEN; or one is minted from $JWT_SECRET)",
    )
    p.add_argument("--duration", type=float, default=30.0, help="seconds of workload (default 30)")
    p.add_argument("--clients", type=int, default=2, help="set clients per node (default 2)")
    p.add_argument("--keys", type=int, default=2, help="registers (default 2, two clients each)")
    p.add_argument("--max-ops", type=int, default=20_000, help="hard cap on operations (default 20000)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds per request (default 5)")
    p.add_argument("--converge", type=float, default=60.0, help="seconds to wait for identical nodes")
    p.add_argument(
        "--stop-container",
        metavar="NAME",
        help="docker stop NAME a third into the run and docker start it at two thirds",
    )
    p.add_argument("--docker", default="docker", help="the docker client (default: docker)")
    p.add_argument("--out", type=Path, help="directory for history.jsonl and report.json")
    p.add_argument("--keep-table", action="store_true", help="leave the check tables in place")
    args = p.parse_args(argv)
    if not args.token:
        secret = os.environ.get("JWT_SECRET")
        if not secret:
            p.error("give --token (or TN_TOKEN), or JWT_SECRET to mint one")
        from node import auth

        args.token = auth.mint_jwt(secret, auth.Role.WRITE, now=time.time(), ttl_s=args.duration + 600)
    if args.clients < 0 or args.keys < 0 or (args.clients == 0 and args.keys == 0):
        p.error("--clients and --keys must be >= 0, not both 0")
    return args


async def _docker(docker: str, *argv: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        docker, *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    _, err = await proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"{docker} {' '.join(argv)} failed: {err.decode(errors='replace').strip()}")


async def run(args: argparse.Namespace) -> int:
    config = WorkloadConfig(
        urls=tuple(u.rstrip("/") for u in args.urls),
        token=args.token,
        duration_s=args.duration,
        set_clients_per_node=args.clients,
        register_keys=args.keys,
        max_ops=args.max_ops,
        request_timeout_s=args.timeout,
    )
    recorder = Recorder()
    workload = Workload(config, recorder)
    fault: dict[str, float] = {}

    async def stop_and_start() -> None:
        await asyncio.sleep(args.duration / 3)
        fault["start"] = recorder.mark(f"docker stop {args.stop_container}")
        await _docker(args.docker, "stop", "-t", "10", args.stop_container)
        await asyncio.sleep(args.duration / 3)
        await _docker(args.docker, "start", args.stop_container)
        fault["end"] = recorder.mark(f"docker start {args.stop_container}")

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        client = Client(config, session)
        print(f"checking {', '.join(config.urls)} with table {workload.table}", file=sys.stderr)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(workload.run(session))
            if args.stop_container:
                tg.create_task(stop_and_start())
        contents, converge_s = await report.converge(client, config.urls, workload.table, args.converge)
        if not args.keep_table:
            await client.drop(workload.table, 60.0)
    result = report.judge(
        recorder.ops,
        contents,
        initial={k: 0 for k in workload.keys},
        converge_s=converge_s,
        fault_start=fault.get("start"),
        fault_end=fault.get("end"),
    )
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "history.jsonl").write_text(history.dump_jsonl(recorder.ops))
        (args.out / "report.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    label = f"stop {args.stop_container}" if args.stop_container else "no fault"
    print(report.table([(label, result)]))
    print("every promise held" if result["valid"] else "VIOLATIONS: see the report", file=sys.stderr)
    if not result["valid"]:
        print(json.dumps(result, indent=2, sort_keys=True), file=sys.stderr)
    return 0 if result["valid"] else 1


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    try:
        return asyncio.run(run(args))
    except BaseExceptionGroup as group:  # from the TaskGroup: report the first cause, not a traceback tree
        first = group.exceptions[0]
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        if not isinstance(first, RuntimeError | ValueError | OSError):
            raise
        print(f"deploy/check: {first}", file=sys.stderr)
        return 2
    except (RuntimeError, ValueError, OSError) as e:
        print(f"deploy/check: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
