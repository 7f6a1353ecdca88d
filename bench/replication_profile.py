"""Where a replicated write's time goes: three REPLICATION=on nodes, closed-loop writers on the leader,
optionally each node sampled by ``py-spy`` while the load runs.

Not a test: it asserts nothing. It exists because the figures of ``cluster_bench.py`` say how fast, not
why; this prints writes/s and latency for each client count and, with ``--py-spy PATH``, writes one
``py-spy record --format raw`` file per node (leader and followers named) to ``--out``, ready for
flamegraph.pl or ``--top`` (a short table of the hottest functions, by own and by total samples).

    .venv/bin/python bench/replication_profile.py --clients 1,32 --seconds 8
    .venv/bin/python bench/replication_profile.py --clients 32 --py-spy /path/to/py-spy --out /tmp/prof --top
    .venv/bin/python bench/replication_profile.py --clients 32 --via follower   # writes forwarded by a follower
    .venv/bin/python bench/replication_profile.py --clients 32 --timeline       # latency stage by stage

``--timeline`` installs ``bench/write_timeline.py`` in the nodes and prints, for each client count, where a
write's latency goes between the request read and the answer written (see that module for the stages).

Every loop is bounded in time; every process started is killed and the data directories removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import cluster_bench as cb  # noqa: E402
from bench import write_timeline  # noqa: E402


def cpu_seconds(pid: int, which: str = "both") -> float:
    """User + system (or ``which`` = "user" / "system" alone) CPU time of a process and all its threads so
    far (Linux /proc), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    user, system = int(fields[11]), int(fields[12])
    ticks = {"both": user + system, "user": user, "system": system}[which]
    return ticks / os.sysconf("SC_CLK_TCK")


def switch_counts(status: str) -> tuple[int, int]:
    """(voluntary, involuntary) context switches from the text of a /proc/<pid>/task/<tid>/status file."""
    counts = {"voluntary_ctxt_switches": 0, "nonvoluntary_ctxt_switches": 0}
    for line in status.splitlines():
        name, _, value = line.partition(":")
        if name in counts and value.strip().isdigit():
            counts[name] = int(value)
    return counts["voluntary_ctxt_switches"], counts["nonvoluntary_ctxt_switches"]


def context_switches(pid: int) -> tuple[int, int]:
    """(voluntary, involuntary) context switches of every live thread of a process so far (Linux /proc).

    Each hand-off that has to wait costs one: a thread blocking on the GIL, a queue or a socket is a
    voluntary switch; one preempted while it could run (more runnable threads than cores) an involuntary
    one. Per write, they show what CPU per write alone hides: the kernel work of passing a write between
    the loop, the log and SQLite threads and the processes. A thread that ended takes its counts with it.
    """
    voluntary = involuntary = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            v, n = switch_counts((task / "status").read_text())
        except OSError:
            continue  # the thread ended between the listing and the read
        voluntary += v
        involuntary += n
    return voluntary, involuntary


def top_functions(raw: Path, limit: int = 25) -> str:
    """py-spy raw (collapsed stacks, one 'frame;frame;... count' a line) -> own and total sample tables."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        samples += count
        frames = stack.split(";")
        own[frames[-1]] += count
        for frame in set(frames):
            total[frame] += count
    lines = [f"{raw.name}: {samples} samples", "  own%  function"]
    lines += [f"  {100 * c / max(1, samples):5.1f} {f}" for f, c in own.most_common(limit)]
    lines += ["  total% function"]
    lines += [f"  {100 * c / max(1, samples):5.1f} {f}" for f, c in total.most_common(limit)]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    env = {"LOG_LEVEL": "warning", "REPLICATION": "on"}
    if not args.timeline:
        return asyncio.run(amain(args, env, None))
    hooks = Path(tempfile.mkdtemp(prefix="write-timeline-"))
    timeline = hooks / "dumps"
    timeline.mkdir()
    repo = Path(__file__).resolve().parents[1]
    (hooks / "sitecustomize.py").write_text(write_timeline.sitecustomize_source(repo))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(hooks), os.environ.get("PYTHONPATH", "")) if p)
    env["TN_TIMELINE_DIR"] = str(timeline)
    try:
        return asyncio.run(amain(args, env, timeline))
    finally:
        shutil.rmtree(hooks, ignore_errors=True)


async def amain(args: argparse.Namespace, env: dict[str, str], timeline: Path | None) -> int:
    import aiohttp

    from node import auth
    from tests.support.cluster import Cluster

    out: Path = args.out
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        with tempfile.TemporaryDirectory() as tmp, Cluster(Path(tmp), size=3, env=env) as c:
            await asyncio.to_thread(c.start_all, cb.FORM_DEADLINE_S)
            token = auth.mint_jwt(c.jwt_secret, auth.Role.WRITE, now=time.time(), ttl_s=3600, subject="prof")
            leader = c.leader_ip()
            headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
            setup = json.dumps(["CREATE TABLE IF NOT EXISTS bench (id INTEGER PRIMARY KEY, client INTEGER, "
                                "n INTEGER, payload TEXT)"]).encode()  # fmt: skip
            created = None
            for _ in range(100):  # the leader is writable once its EpochStart entry commits
                created = await cb.get_json(
                    session, "POST", f"{c.nodes[leader].url}/db/execute", 5.0, data=setup, headers=headers
                )
                if cb.tn_ok(200, created):
                    break
                await asyncio.sleep(0.2)
            if not cb.tn_ok(200, created):
                raise RuntimeError(f"could not create the table: {created!r}")
            # The follower path: the same writes sent to the lowest node, which forwards them to the leader.
            entry = leader if args.via == "leader" else min(ip for ip in c.nodes if ip != leader)
            target = cb.tn_target(c.nodes[entry].url, token)
            # What the nodes cost with no client at all (heartbeats, probes, timers): the floor under every
            # CPU-per-write figure below.
            pids = {ip: node.proc.pid for ip, node in c.nodes.items()}
            idle_before = {ip: cpu_seconds(pid) for ip, pid in pids.items()}
            await asyncio.sleep(args.idle)
            print(
                "idle: CPU ms/s "
                + ", ".join(
                    f"{'leader' if ip == leader else ip} {1000 * (cpu_seconds(pid) - idle_before[ip]) / args.idle:.0f}"
                    for ip, pid in pids.items()
                ),
                flush=True,
            )
            for clients in args.clients:
                spies: list[tuple[subprocess.Popen, Path]] = []
                if args.py_spy:
                    for ip, node in c.nodes.items():
                        role = "leader" if ip == leader else "entry" if ip == entry else "follower"
                        path = out / f"{role}-{ip}-{clients}c.txt"
                        spy = await asyncio.to_thread(
                            subprocess.Popen,
                            [args.py_spy, "record", "--format", "raw", "--rate", "250", "--nonblocking",
                             "--duration", str(int(args.seconds + args.warmup)), "--pid",
                             str(node.proc.pid), "--output", str(path), *(["--gil"] * args.gil)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                        )  # fmt: skip
                        spies.append((spy, path))
                pids = {ip: node.proc.pid for ip, node in c.nodes.items()}
                cpu_before = {ip: cpu_seconds(pid) for ip, pid in pids.items()}
                sys_before = {ip: cpu_seconds(pid, "system") for ip, pid in pids.items()}
                switches_before = {ip: context_switches(pid) for ip, pid in pids.items()}
                measured_from = time.time() + args.warmup
                stats = await cb.drive(session, target, clients, args.warmup, args.seconds, 1_000_000)
                # CPU per write is what a loaded machine cannot hide: scheduling delays inflate latency, not it.
                writes = max(1, round(stats.writes_per_s * (args.seconds + args.warmup)))
                cpu_ms = {
                    ("leader" if ip == leader else ip): 1000 * (cpu_seconds(pid) - cpu_before[ip]) / writes
                    for ip, pid in pids.items()
                }
                sys_ms = {
                    ("leader" if ip == leader else ip): 1000
                    * (cpu_seconds(pid, "system") - sys_before[ip])
                    / writes
                    for ip, pid in pids.items()
                }
                switches = {
                    ("leader" if ip == leader else ip): tuple(
                        (after - before) / writes
                        for after, before in zip(context_switches(pid), switches_before[ip], strict=True)
                    )
                    for ip, pid in pids.items()
                }
                print(
                    f"{clients:>3} clients: {stats.writes_per_s:8.0f} writes/s  p50 {stats.p50_ms:.2f} ms  "
                    f"p99 {stats.p99_ms:.2f} ms  errors {stats.errors}  CPU ms/write (approx., of it system) "
                    + ", ".join(f"{k} {v:.2f} ({sys_ms[k]:.2f})" for k, v in cpu_ms.items())
                    + "; context switches/write (voluntary + involuntary) "
                    + ", ".join(f"{k} {v:.1f} + {n:.1f}" for k, (v, n) in switches.items()),
                    flush=True,
                )
                if timeline is not None:
                    await asyncio.sleep(2 * write_timeline.DUMP_EVERY_S)  # every node's last dump is written
                    print(_timeline_table(timeline, pids, leader, entry, clients, measured_from), flush=True)
                for spy, path in spies:
                    try:
                        await asyncio.to_thread(spy.wait, 30)
                    except subprocess.TimeoutExpired:
                        spy.kill()
                        spy.wait(timeout=5)
                    if args.top and path.exists():
                        print(top_functions(path), flush=True)
            statuses = await asyncio.to_thread(c.statuses, c.ips, 1.0)
            for ip, st in statuses.items():
                if isinstance(st, dict):
                    print(ip, json.dumps(st.get("replication_stats")), flush=True)
    return 0


def _timeline_table(
    directory: Path, pids: dict[str, int], leader: str, entry: str, clients: int, since: float
) -> str:
    """The leader's stages and turn-around, and every follower's append-to-ack, of the measured period."""
    dumps = write_timeline.read_dumps(directory)
    columns = write_timeline.merge([d for d in dumps if d.get("pid") == pids[leader]], since)
    others = [d for d in dumps if d.get("pid") != pids[leader]]
    columns[write_timeline.FOLLOWER] = write_timeline.merge(others, since)[write_timeline.FOLLOWER]
    via = (
        ""
        if entry == leader
        else " (requests forwarded by a follower: the leader's stages start at its read)"
    )
    return write_timeline.format_table(
        write_timeline.summarize(columns), f"write timeline, {clients} clients, on the leader{via}:"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--clients", type=cb.parse_client_counts, default=(1, 32))
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--idle", type=float, default=3.0, help="seconds of no load measured first (3)")
    parser.add_argument("--py-spy", default=None, help="py-spy binary: sample every node while the load runs")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "replication-profile")
    parser.add_argument(
        "--gil",
        action="store_true",
        help="sample only the thread holding the GIL: where Python CPU goes, waits and syscalls left out",
    )
    parser.add_argument(
        "--via", choices=("leader", "follower"), default="leader",
        help="send the writes to the leader (default) or to a follower, which forwards them",
    )  # fmt: skip
    parser.add_argument("--top", action="store_true", help="print the hottest functions of each profile")
    parser.add_argument(
        "--timeline", action="store_true",
        help="time each write's stages inside the nodes (bench/write_timeline.py) and print where latency goes",
    )  # fmt: skip
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
