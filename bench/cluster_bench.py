"""Three-node write benchmark: Talent Nest against etcd 3.4 on loopback, driven by one aiohttp client.

Not a test: it asserts nothing, prints a table and writes the figures as JSON. See bench/README.md.

    .venv/bin/python bench/cluster_bench.py                      # defaults: 1 and 32 clients, 5 s phases
    .venv/bin/python bench/cluster_bench.py --seconds 10 --clients 1,8,32 --trials 5 --require-etcd

What it does, in order:
1. Talent Nest: three real ``python -m node`` processes on 127.0.S.2-4 behind the test DNS server
   (tests/support/cluster.py), default settings; a table is created through the leader, then each phase
   sends ``POST /db/execute`` with one INSERT of a ~100-byte row per request, through the leader and through
   a follower, with each client count (warm-up first, then a fixed duration). A poller watches every node's
   ``/cluster/status`` (leader_id, epoch) to count leader changes. Then kill -9 of the leader under a light
   write load, N times: the time from the kill to the first successful write through a survivor.
2. etcd (binary ``etcd``, Debian package ``etcd-server``): three members on 127.0.T.2-4, static bootstrap
   with ``--initial-cluster``, data in a temporary directory. The same client code sends ``POST /v3/kv/put``
   (JSON gateway, base64 key and a value of the same size as the row). Leader found and leader changes
   counted with ``POST /v3/maintenance/status``. The same failover trials.
3. A table per (path, clients) with both systems and the ratio Talent Nest / etcd, the failover figures, the
   leader changes, and the musts of the replication issue as met/missed lines.

Before replication is wired, each node serves its own database: a Talent Nest "cluster write" is a local
write on the node asked. The musts are then labelled as such; the label goes away by itself once
``/cluster/status`` has a ``commit_index`` key.

Every loop is bounded in count and time; all traffic stays on loopback; every process started here is
killed (and every data directory removed) on the way out, whatever happens.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import math
import os
import platform
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PRE_REPLICATION_LABEL = "(before replication: Talent Nest writes are local to the node asked)"
TN = "talentnest"
ETCD = "etcd"
ROW_PAYLOAD_BYTES = 100
FORM_DEADLINE_S = 30.0  # a cluster that takes longer than this to form or recover is an error
REQUEST_TIMEOUT_S = 5.0  # one request during a throughput phase
# One request during a failover trial. Short on purpose: etcd holds a put sent while it has no leader until its
# own request timeout (5 s + 2 election timeouts = 7 s) even though later puts succeed after ~1 s; with a long
# client timeout those held requests would fill the in-flight bound and hide the recovery.
FAILOVER_REQUEST_TIMEOUT_S = 1.0
FAILOVER_TICK_S = 0.01  # light load: one write every 10 ms per member (the resolution of the measurement)
# Per member; a tick finding this many in flight is skipped (dropped). Above timeout / tick, so a tick is only
# dropped if requests are stuck beyond their timeout.
FAILOVER_MAX_IN_FLIGHT = 150
STATUS_POLL_S = 0.1  # leader-change poller interval


# --- pure parts (tested in tests/test_cluster_bench.py) --------------------------------------------------


def parse_client_counts(text: str) -> tuple[int, ...]:
    """``"1,32"`` -> (1, 32): positive, distinct, in the order given."""
    counts: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        value = int(part)
        if value < 1 or value > 1024:
            raise ValueError(f"client count {value} out of range 1..1024")
        if value not in counts:
            counts.append(value)
    if not counts:
        raise ValueError("no client count given")
    return tuple(counts)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cluster_bench.py",
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--clients", type=parse_client_counts, default=(1, 32), help="client counts (1,32)")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured duration of a phase (5)")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured warm-up before a phase (1)")
    parser.add_argument("--max-requests", type=int, default=500_000, help="cap on requests per phase")
    parser.add_argument("--trials", type=int, default=3, help="kill -9 failover trials per system (3)")
    parser.add_argument(
        "--failover-deadline", type=float, default=30.0, help="give up on a failover trial after S s (30)"
    )
    parser.add_argument("--require-etcd", action="store_true", help="fail if the etcd binary is missing")
    parser.add_argument("--etcd-bin", default="etcd", help="etcd binary (name on PATH or a path)")
    parser.add_argument("--skip-etcd", action="store_true", help="measure Talent Nest only")
    parser.add_argument("--skip-failover", action="store_true", help="throughput phases only")
    parser.add_argument(
        "--rounds", type=int, default=1,
        help="measure both systems this many times, alternating which goes first (1; failover: round 1)",
    )  # fmt: skip
    parser.add_argument(
        "--replication",
        choices=("on", "off"),
        default="on",
        help="REPLICATION of the Talent Nest nodes (on: majority-committed writes, as etcd's)",
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=Path(tempfile.gettempdir()) / "cluster_bench.json",
        help="where to write the figures (default: cluster_bench.json in the temp dir)",
    )
    parser.add_argument("--logs", type=Path, default=None, help="keep node/etcd logs here (default: temp)")
    parser.add_argument(
        "--log-level", default="warning", help="the nodes' LOG_LEVEL (warning; info shows every election)"
    )
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not (0 < args.seconds <= 3600) or not (0 <= args.warmup <= 600):
        parser.error("--seconds must be in (0, 3600] and --warmup in [0, 600]")
    if args.max_requests < 1 or args.trials < 0 or args.trials > 100:
        parser.error("--max-requests must be >= 1 and --trials in 0..100")
    if not 0 < args.failover_deadline <= 600:
        parser.error("--failover-deadline must be in (0, 600]")
    if not 1 <= args.rounds <= 20:
        parser.error("--rounds must be in 1..20")
    if args.require_etcd and args.skip_etcd:
        parser.error("--require-etcd and --skip-etcd contradict each other")
    return args


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100]) of an ascending sequence; None when it is empty.

    Nearest rank, not interpolation: the figure is a latency some request really had."""
    if not 0 <= q <= 100:
        raise ValueError("q must be in [0, 100]")
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


@dataclass(frozen=True, slots=True)
class PhaseStats:
    """One measured phase: successful writes only count towards writes/s and the latencies."""

    ok: int
    errors: int
    elapsed_s: float
    writes_per_s: float
    p50_ms: float | None
    p99_ms: float | None
    # CPU per write during the phase (warm-up included, over its writes): the system's three processes
    # together, and this client. On a saturated machine throughput is what the two sum to.
    server_cpu_ms: float | None = None
    client_cpu_ms: float | None = None


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU of a process and its threads so far (Linux /proc), None where unreadable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_per_write_ms(before: float | None, after: float | None, writes: float) -> float | None:
    if before is None or after is None or writes <= 0:
        return None
    return 1000 * (after - before) / writes


def summarize(latencies_s: Iterable[float], errors: int, elapsed_s: float) -> PhaseStats:
    values = sorted(latencies_s)
    p50 = percentile(values, 50)
    p99 = percentile(values, 99)
    return PhaseStats(
        ok=len(values),
        errors=errors,
        elapsed_s=elapsed_s,
        writes_per_s=len(values) / elapsed_s if elapsed_s > 0 else 0.0,
        p50_ms=None if p50 is None else p50 * 1000,
        p99_ms=None if p99 is None else p99 * 1000,
    )


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, None when either is missing or the denominator is not positive."""
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def median(values: Sequence[float]) -> float | None:
    if not values:
        return None
    s = sorted(values)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


def count_changes(observations: Iterable[object]) -> int:
    """How many times a sequence of observations changes value; None (no answer) is skipped, so a node
    that does not answer for a moment is not a change."""
    changes = 0
    last: object = None
    for value in observations:
        if value is None:
            continue
        if last is not None and value != last:
            changes += 1
        last = value
    return changes


def is_replicated(status: Mapping[str, Any] | None) -> bool:
    """Replication is wired once /cluster/status reports a commit index."""
    return isinstance(status, Mapping) and "commit_index" in status


def settled(statuses: Sequence[object], size: int) -> bool:
    """Every member answered, all name the same leader and epoch, and the cluster has ``size`` voters.

    The throughput phases start only then: a cluster starting from nothing forms in steps (one node
    bootstraps after its formation window, the others join as learners and are promoted), and each step
    changes what a member reports. Counted during a phase, those steps read as leader changes that load
    never caused."""
    if len(statuses) != size or not all(isinstance(st, Mapping) for st in statuses):
        return False
    views = {(st.get("leader_id"), st.get("epoch")) for st in statuses}  # type: ignore[union-attr]
    if len(views) != 1 or next(iter(views))[0] is None:
        return False
    return all(
        sum(1 for n in st.get("nodes") or () if isinstance(n, Mapping) and n.get("voter") is True) == size
        for st in statuses  # type: ignore[union-attr]
    )


def etcd_put_body(key: bytes, value: bytes) -> bytes:
    """The JSON gateway's PutRequest: bytes fields are base64."""
    return json.dumps(
        {"key": base64.b64encode(key).decode("ascii"), "value": base64.b64encode(value).decode("ascii")}
    ).encode()


def tn_insert_body(client: int, n: int, payload: str) -> bytes:
    return json.dumps(
        [["INSERT INTO bench(client, n, payload) VALUES(?, ?, ?)", client, n, payload]]
    ).encode()


def etcd_initial_cluster(members: Sequence[tuple[str, str]]) -> str:
    """``--initial-cluster`` from (name, peer URL) pairs."""
    return ",".join(f"{name}={url}" for name, url in members)


def payload_for(client: int, n: int, size_bytes: int = ROW_PAYLOAD_BYTES) -> str:
    """A row/value of exactly ``size_bytes`` ASCII bytes, distinct per (client, n)."""
    head = f"c{client}n{n}:"
    return (head + "x" * size_bytes)[:size_bytes]


@dataclass(frozen=True, slots=True)
class Row:
    path: str  # "leader" or "follower"
    clients: int
    tn: PhaseStats | None
    etcd: PhaseStats | None

    @property
    def ratio(self) -> float | None:
        return ratio(self.tn and self.tn.writes_per_s, self.etcd and self.etcd.writes_per_s)


@dataclass(frozen=True, slots=True)
class Failover:
    """Seconds from kill -9 of the leader to the first successful write through a survivor, per trial;
    None for a trial that saw no success before the deadline."""

    trials_s: tuple[float | None, ...] = ()

    @property
    def median_s(self) -> float | None:
        return median([t for t in self.trials_s if t is not None])

    @property
    def failed(self) -> int:
        return sum(1 for t in self.trials_s if t is None)


@dataclass(frozen=True, slots=True)
class Must:
    text: str
    verdict: str  # "met", "missed" or "not measured"
    detail: str


def _fmt(value: float | None, spec: str, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}{spec}}"


def _stats_cells(stats: PhaseStats | None) -> str:
    if stats is None:
        return f"{'-':>9} {'-':>8} {'-':>8} {'-':>6}"
    return (
        f"{stats.writes_per_s:>9.0f} {_fmt(stats.p50_ms, '.2f', 8)} {_fmt(stats.p99_ms, '.2f', 8)} "
        f"{stats.errors:>6}"
    )


def format_table(rows: Sequence[Row]) -> str:
    """One line per (path, clients): Talent Nest and etcd writes/s, p50, p99, errors, and the ratio."""
    head1 = f"{'':<9} {'':>7} | {'Talent Nest':^35} | {'etcd':^35} | {'TN/etcd':>7}"
    head2 = (
        f"{'path':<9} {'clients':>7} | {'writes/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6} | "
        f"{'writes/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6} | {'ratio':>7}"
    )
    lines = [head1, head2, "-" * len(head2)]
    for row in rows:
        lines.append(
            f"{row.path:<9} {row.clients:>7} | {_stats_cells(row.tn)} | {_stats_cells(row.etcd)} | "
            f"{_fmt(row.ratio, '.2f', 7)}"
        )
    return "\n".join(lines)


def format_failover(tn: Failover | None, etcd: Failover | None) -> str:
    def one(name: str, f: Failover | None) -> str:
        if f is None or not f.trials_s:
            return f"{name:<12} not measured"
        trials = ", ".join("timeout" if t is None else f"{t * 1000:.0f}" for t in f.trials_s)
        return (
            f"{name:<12} median {_fmt(f.median_s and f.median_s * 1000, '.0f', 6)} ms   trials (ms): {trials}"
        )

    r = ratio(tn and tn.median_s, etcd and etcd.median_s)
    return "\n".join(
        [
            "kill -9 of the leader -> first successful write through a survivor:",
            "  " + one("Talent Nest", tn),
            "  " + one("etcd", etcd),
            f"  ratio TN/etcd (lower is better): {_fmt(r, '.2f', 0)}",
        ]
    )


def _row(rows: Sequence[Row], path: str, clients: int) -> Row | None:
    return next((r for r in rows if r.path == path and r.clients == clients), None)


def evaluate_musts(
    rows: Sequence[Row], tn_failover: Failover | None, etcd_failover: Failover | None
) -> list[Must]:
    """The issue's musts, through the leader: 32 clients >= 1x etcd, 1 client >= 0.5x, failover <= etcd's."""
    musts = []
    for clients, floor in ((32, 1.0), (1, 0.5)):
        text = (
            f"through the leader, {clients} client{'s' if clients > 1 else ''}: writes/s >= {floor:g}x etcd"
        )
        row = _row(rows, "leader", clients)
        r = None if row is None else row.ratio
        if r is None:
            musts.append(Must(text, "not measured", "no figure for both systems"))
        else:
            musts.append(Must(text, "met" if r >= floor else "missed", f"ratio {r:.2f}"))
    text = "failover (kill -9 of the leader -> first successful write): <= etcd's"
    tn_s = tn_failover and tn_failover.median_s
    etcd_s = etcd_failover and etcd_failover.median_s
    if tn_s is None or etcd_s is None:
        musts.append(Must(text, "not measured", "no median for both systems"))
    else:
        verdict = "met" if tn_s <= etcd_s else "missed"
        musts.append(Must(text, verdict, f"{tn_s * 1000:.0f} ms vs {etcd_s * 1000:.0f} ms"))
    return musts


def format_musts(musts: Sequence[Must], replicated: bool) -> str:
    title = "musts from the replication issue" + ("" if replicated else " " + PRE_REPLICATION_LABEL)
    lines = [title + ":"]
    for m in musts:
        lines.append(f"  [{m.verdict}] {m.text} ({m.detail})")
    return "\n".join(lines)


def format_leader_changes(tn: int | None, etcd: int | None) -> str:
    def cell(v: int | None) -> str:
        return "not measured" if v is None else str(v)

    measured = [v for v in (tn, etcd) if v is not None]
    verdict = "not measured" if not measured else ("met" if all(v == 0 for v in measured) else "missed")
    return (
        f"leader changes during the throughput phases: Talent Nest {cell(tn)}, etcd {cell(etcd)} "
        f"[{verdict}: load alone must cause none]"
    )


# --- the one client: the same code drives both systems ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    """Where and how to write: the only thing that differs between the two systems."""

    system: str
    url: str  # the full write URL
    headers: Mapping[str, str]
    body: Callable[[int, int], bytes]  # (client, n) -> request body
    ok: Callable[[int, Any], bool]  # (HTTP status, parsed JSON) -> write succeeded


def tn_ok(status: int, payload: Any) -> bool:
    if status != 200 or not isinstance(payload, dict) or "error" in payload:
        return False
    results = payload.get("results")
    return isinstance(results, list) and bool(results) and "error" not in results[0]


def etcd_ok(status: int, payload: Any) -> bool:
    return status == 200 and isinstance(payload, dict) and "error" not in payload and "header" in payload


async def write_once(session: Any, target: Target, client: int, n: int, timeout_s: float) -> bool:
    import aiohttp

    try:
        async with session.post(
            target.url,
            data=target.body(client, n),
            headers={**target.headers, "Content-Type": "application/json"},
            timeout=aiohttp.ClientTimeout(total=timeout_s),
        ) as resp:
            raw = await resp.read()
            try:
                payload = json.loads(raw)
            except ValueError:
                payload = None
            return target.ok(resp.status, payload)
    except (TimeoutError, aiohttp.ClientError, OSError):
        return False


async def drive(
    session: Any, target: Target, clients: int, warmup_s: float, seconds: float, max_requests: int
) -> PhaseStats:
    """``clients`` closed-loop writers for warm-up + ``seconds``; only requests started after the warm-up
    count. Bounded by time and by ``max_requests`` (warm-up included)."""
    latencies: list[float] = []
    errors = 0
    issued = 0
    begin = time.perf_counter()
    measure_from = begin + warmup_s
    deadline = measure_from + seconds

    async def client(c: int) -> None:
        nonlocal errors, issued
        n = 0
        while issued < max_requests:
            started = time.perf_counter()
            if started >= deadline:
                return
            issued += 1
            n += 1
            ok = await write_once(session, target, c, n, REQUEST_TIMEOUT_S)
            if started >= measure_from:
                if ok:
                    latencies.append(time.perf_counter() - started)
                else:
                    errors += 1
            if not ok:
                await asyncio.sleep(0.005)  # a failing server is not hammered in a tight loop

    async with asyncio.TaskGroup() as tg:
        for c in range(clients):
            tg.create_task(client(c))
    elapsed = max(0.0, min(time.perf_counter(), deadline + REQUEST_TIMEOUT_S) - measure_from)
    return summarize(latencies, errors, elapsed)


async def light_load_until_survivor_write(
    session: Any,
    targets: Mapping[str, Target],
    kill: Callable[[], Awaitable[float]],
    victim: str,
    deadline_s: float,
) -> float | None:
    """Light open-loop load (one write every FAILOVER_TICK_S per member, at most FAILOVER_MAX_IN_FLIGHT in
    flight per member: a tick finding that many is dropped) on every member; after 0.5 s ``kill()`` the
    victim (it returns the perf_counter time of the kill) and return the seconds from the kill to the first
    successful write sent to a survivor after the kill; None if none succeeds within ``deadline_s``."""
    killed_at: float | None = None
    first_ok: list[float] = []
    done = asyncio.Event()
    in_flight = {name: 0 for name in targets}

    async def one(name: str, c: int, n: int) -> None:
        sent = time.perf_counter()
        try:
            ok = await write_once(session, targets[name], c, n, FAILOVER_REQUEST_TIMEOUT_S)
        finally:
            in_flight[name] -= 1
        if ok and killed_at is not None and sent >= killed_at and name != victim:
            first_ok.append(time.perf_counter() - killed_at)
            done.set()

    start = time.perf_counter()
    max_ticks = int((0.5 + deadline_s) / FAILOVER_TICK_S) + 10
    async with asyncio.TaskGroup() as tg:
        for tick in range(max_ticks):
            now = time.perf_counter()
            if killed_at is None and now - start >= 0.5:
                killed_at = await kill()
            if done.is_set() or (killed_at is not None and now - killed_at > deadline_s):
                break
            for c, name in enumerate(targets):
                if (killed_at is not None and name == victim) or in_flight[name] >= FAILOVER_MAX_IN_FLIGHT:
                    continue
                in_flight[name] += 1
                tg.create_task(one(name, c, tick))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(done.wait(), FAILOVER_TICK_S)
        # Requests still in flight are bounded by FAILOVER_REQUEST_TIMEOUT_S; the TaskGroup awaits them.
    return min(first_ok) if first_ok else None


class LeaderWatch:
    """Polls every member's view of the leader while a phase runs; counts changes per member."""

    def __init__(self, session: Any, probe: Callable[[Any, str], Awaitable[object]], members: Sequence[str]):
        self._session = session
        self._probe = probe
        self._seen: dict[str, list[object]] = {m: [] for m in members}
        self._stop = asyncio.Event()

    async def run(self, max_polls: int = 100_000) -> None:
        for _ in range(max_polls):
            if self._stop.is_set():
                return
            views = await asyncio.gather(*(self._probe(self._session, m) for m in self._seen))
            for member, view in zip(self._seen, views, strict=True):
                self._seen[member].append(view)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), STATUS_POLL_S)

    def stop(self) -> None:
        self._stop.set()

    def changes(self) -> int:
        """The most changes any one member saw (each member sees the same change once)."""
        return max((count_changes(v) for v in self._seen.values()), default=0)


async def get_json(session: Any, method: str, url: str, timeout_s: float = 1.0, **kw: Any) -> Any:
    import aiohttp

    try:
        async with session.request(method, url, timeout=aiohttp.ClientTimeout(total=timeout_s), **kw) as r:
            if r.status != 200:
                return None
            return json.loads(await r.read())
    except (TimeoutError, aiohttp.ClientError, OSError, ValueError):
        return None


async def run_phases(
    session: Any,
    targets: Mapping[str, Target],
    watch: LeaderWatch,
    counts: Sequence[int],
    args: argparse.Namespace,
    label: str,
    pids: Sequence[int] = (),
) -> dict[tuple[str, int], PhaseStats]:
    """Each path at each client count; ``pids`` (the system's processes) for its CPU per write."""
    out: dict[tuple[str, int], PhaseStats] = {}

    def server_cpu_s() -> float | None:
        readings = [process_cpu_s(pid) for pid in pids]
        return None if not readings or None in readings else sum(r for r in readings if r is not None)

    async with asyncio.TaskGroup() as tg:
        tg.create_task(watch.run())
        try:
            for path, target in targets.items():
                for clients in counts:
                    server_before, client_before = server_cpu_s(), time.process_time()
                    stats = await drive(
                        session, target, clients, args.warmup, args.seconds, args.max_requests
                    )
                    writes = stats.writes_per_s * (args.warmup + args.seconds)  # approx.: warm-up included
                    stats = replace(
                        stats,
                        server_cpu_ms=cpu_per_write_ms(server_before, server_cpu_s(), writes),
                        client_cpu_ms=cpu_per_write_ms(client_before, time.process_time(), writes),
                    )
                    out[(path, clients)] = stats
                    print(
                        f"  {label:<11} {path:<8} {clients:>3} clients: {stats.writes_per_s:8.0f} writes/s  "
                        f"p50 {_fmt(stats.p50_ms, '.2f', 7)} ms  p99 {_fmt(stats.p99_ms, '.2f', 7)} ms  "
                        f"errors {stats.errors}  CPU ms/write: servers {_fmt(stats.server_cpu_ms, '.2f', 4)}, "
                        f"client {_fmt(stats.client_cpu_ms, '.2f', 4)}",
                        flush=True,
                    )
        finally:
            watch.stop()
    return out


# --- Talent Nest ------------------------------------------------------------------------------------------


async def tn_probe(session: Any, base_url: str) -> object:
    st = await get_json(session, "GET", f"{base_url}/cluster/status", timeout_s=0.5)
    if not isinstance(st, dict):
        return None
    return (st.get("leader_id"), st.get("epoch"))


async def tn_wait_writable(session: Any, base_url: str, timeout_s: float) -> bool:
    """Until ``/cluster/status`` of that node says writable (bounded by ``timeout_s``)."""
    for _ in range(int(timeout_s / 0.1) + 1):
        st = await get_json(session, "GET", f"{base_url}/cluster/status", timeout_s=0.5)
        if isinstance(st, dict) and st.get("writable") is True:
            return True
        await asyncio.sleep(0.1)
    return False


async def tn_wait_settled(session: Any, base_urls: Sequence[str], timeout_s: float) -> bool:
    """Until every member's ``/cluster/status`` is :func:`settled` (bounded by ``timeout_s``)."""
    for _ in range(int(timeout_s / 0.1) + 1):
        statuses = await asyncio.gather(
            *(get_json(session, "GET", f"{url}/cluster/status", timeout_s=0.5) for url in base_urls)
        )
        if settled(statuses, len(base_urls)):
            return True
        await asyncio.sleep(0.1)
    return False


def tn_target(base_url: str, token: str) -> Target:
    return Target(
        system=TN,
        url=f"{base_url}/db/execute",
        headers={"Authorization": f"Bearer {token}"},
        body=lambda c, n: tn_insert_body(c, n, payload_for(c, n)),
        ok=tn_ok,
    )


async def bench_talentnest(session: Any, args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    from node import auth
    from tests.support.cluster import Cluster, node_id

    result: dict[str, Any] = {}
    env = {"LOG_LEVEL": args.log_level, "REPLICATION": args.replication}
    with Cluster(log_dir / "talentnest", size=3, env=env) as c:
        formed = await asyncio.to_thread(c.start_all, FORM_DEADLINE_S)
        token = auth.mint_jwt(
            c.jwt_secret, auth.Role.WRITE, now=time.time(), ttl_s=24 * 3600, subject="bench"
        )
        statuses = await asyncio.to_thread(c.statuses, c.ips, 1.0)
        leader = c.leader_ip()
        follower = min((ip for ip in c.ips if ip != leader), key=node_id)
        # A status that timed out on a loaded machine must not turn a REPLICATION=on run into a local one.
        replicated = is_replicated(statuses[leader]) or args.replication == "on"
        result["replicated"] = replicated
        print(
            f"Talent Nest: 3 nodes on {c.ips[0]}-{c.ips[-1].rsplit('.', 1)[1]} port {c.port} formed in "
            f"{formed:.2f} s; leader {leader}, follower {follower}; "
            f"{'replicated' if replicated else 'not replicated yet (each node writes locally)'}",
            flush=True,
        )
        setup = json.dumps(
            [
                "CREATE TABLE IF NOT EXISTS bench (id INTEGER PRIMARY KEY, client INTEGER, n INTEGER, payload TEXT)"
            ]
        ).encode()
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        for ip in [leader] if replicated else c.ips:  # before replication every node needs its own table
            created = None
            # A replicated leader is writable once its EpochStart entry commits, a moment after agreement.
            for _ in range(int(FORM_DEADLINE_S / 0.2)):
                created = await get_json(
                    session, "POST", f"{c.nodes[ip].url}/db/execute", 5.0, data=setup, headers=headers
                )
                if tn_ok(200, created):
                    break
                await asyncio.sleep(0.2)
            if not tn_ok(200, created):
                raise RuntimeError(f"could not create the bench table on {ip}: {created!r}")
        if replicated and not await tn_wait_settled(
            session, [n.url for n in c.nodes.values()], FORM_DEADLINE_S
        ):
            raise RuntimeError(
                f"the cluster did not settle (one leader and epoch, 3 voters) in {FORM_DEADLINE_S} s"
            )
        targets = {
            "leader": tn_target(c.nodes[leader].url, token),
            "follower": tn_target(c.nodes[follower].url, token),
        }
        watch = LeaderWatch(session, tn_probe, [c.nodes[ip].url for ip in c.ips])
        pids = [n.proc.pid for n in c.nodes.values() if n.proc is not None]
        result["phases"] = await run_phases(session, targets, watch, args.clients, args, "Talent Nest", pids)
        result["leader_changes"] = watch.changes()

        trials: list[float | None] = []
        for i in range(0 if args.skip_failover else args.trials):
            leader = c.leader_ip()
            victim_url = c.nodes[leader].url
            all_targets = {c.nodes[ip].url: tn_target(c.nodes[ip].url, token) for ip in c.ips}

            async def kill(ip: str = leader) -> float:
                t = time.perf_counter()
                c.nodes[ip].send(signal.SIGKILL)
                return t

            took = await light_load_until_survivor_write(
                session, all_targets, kill, victim_url, args.failover_deadline
            )
            await asyncio.to_thread(c.nodes[leader].wait_exit, 5)
            c.publish_dns()
            trials.append(took)
            await asyncio.to_thread(c.start, leader)
            await asyncio.to_thread(c.wait_agreed, c.ips, FORM_DEADLINE_S)
            if replicated:
                # The restarted highest-ID node takes the lead back by a planned handover: wait until it is
                # the writable leader, or the next trial would kill a follower.
                await tn_wait_writable(session, c.nodes[c.leader_ip()].url, FORM_DEADLINE_S)
            print(
                f"  Talent Nest failover trial {i + 1}/{args.trials}: "
                f"{'timeout' if took is None else f'{took * 1000:.0f} ms'} (killed {leader}; restarted, healthy)",
                flush=True,
            )
        result["failover"] = Failover(tuple(trials))
        for node in c.nodes.values():
            if node.running:
                with contextlib.suppress(Exception):
                    node.stop(signal.SIGTERM, timeout_s=5)
    return result


# --- etcd -------------------------------------------------------------------------------------------------


@dataclass
class EtcdMember:
    name: str
    ip: str
    client_port: int
    peer_port: int
    data_dir: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = field(default=None)

    @property
    def client_url(self) -> str:
        return f"http://{self.ip}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.ip}:{self.peer_port}"

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)


class EtcdCluster:
    """Three etcd members on 127.0.T.2-4, static bootstrap, data under ``root``; killed on exit."""

    def __init__(self, binary: str, root: Path, avoid_subnet: int) -> None:
        from tests.support.cluster import free_port

        subnet = 100 + (avoid_subnet - 100 + 37) % 151  # another /24 than the Talent Nest cluster's
        ips = [f"127.0.{subnet}.{i}" for i in range(2, 5)]
        client_port = free_port(ips)
        peer_port = free_port(ips)
        for _ in range(20):
            if peer_port != client_port:
                break
            peer_port = free_port(ips)
        self.binary = binary
        self.token = f"bench-{secrets.token_hex(4)}"
        self.members = [
            EtcdMember(f"e{i}", ip, client_port, peer_port, root / f"data-e{i}", root / f"etcd-e{i}.log")
            for i, ip in enumerate(ips)
        ]
        self.initial_cluster = etcd_initial_cluster([(m.name, m.peer_url) for m in self.members])

    def command(self, m: EtcdMember) -> list[str]:
        return [
            self.binary,
            f"--name={m.name}",
            f"--data-dir={m.data_dir}",
            f"--listen-client-urls={m.client_url}",
            f"--advertise-client-urls={m.client_url}",
            f"--listen-peer-urls={m.peer_url}",
            f"--initial-advertise-peer-urls={m.peer_url}",
            f"--initial-cluster={self.initial_cluster}",
            "--initial-cluster-state=new",  # ignored by a member restarted on its data directory
            f"--initial-cluster-token={self.token}",
            "--logger=zap",
            "--log-level=warn",
        ]

    def start(self, m: EtcdMember) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}  # no inherited settings
        with open(m.log_path, "ab") as log:
            m.proc = subprocess.Popen(
                self.command(m),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )

    def __enter__(self) -> EtcdCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        for m in self.members:
            m.kill()


async def etcd_status(session: Any, client_url: str) -> dict[str, Any] | None:
    st = await get_json(session, "POST", f"{client_url}/v3/maintenance/status", 0.5, data=b"{}")
    return st if isinstance(st, dict) else None


async def etcd_probe(session: Any, client_url: str) -> object:
    st = await etcd_status(session, client_url)
    if st is None or not st.get("leader") or st.get("leader") == "0":
        return None
    return (st.get("leader"), st.get("raftTerm"))


async def etcd_wait_agreed(session: Any, ec: EtcdCluster, timeout_s: float) -> EtcdMember:
    """Wait until every member answers status naming the same leader among them; return the leader."""
    deadline = time.monotonic() + timeout_s
    last: list[Any] = []
    for _ in range(int(timeout_s / 0.05) + 2):
        last = await asyncio.gather(*(etcd_status(session, m.client_url) for m in ec.members))
        if all(last):
            leaders = {st.get("leader") for st in last}
            ids = {st["header"].get("member_id"): m for st, m in zip(last, ec.members, strict=True)}
            if len(leaders) == 1 and (lid := leaders.pop()) in ids:
                return ids[lid]
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    logs = "\n".join(
        m.log_path.read_text(errors="replace")[-2000:] for m in ec.members if m.log_path.exists()
    )
    raise RuntimeError(f"etcd members did not agree on a leader within {timeout_s:g} s: {last}\n{logs}")


def etcd_target(client_url: str) -> Target:
    return Target(
        system=ETCD,
        url=f"{client_url}/v3/kv/put",
        headers={},
        body=lambda c, n: etcd_put_body(f"bench/{c}/{n}".encode(), payload_for(c, n).encode()),
        ok=etcd_ok,
    )


async def bench_etcd(session: Any, args: argparse.Namespace, log_dir: Path, binary: str, subnet: int) -> dict:
    result: dict[str, Any] = {}
    root = Path(tempfile.mkdtemp(prefix="cluster-bench-etcd-"))
    try:
        with EtcdCluster(binary, root, subnet) as ec:
            for m in ec.members:
                ec.start(m)
            t0 = time.monotonic()
            leader = await etcd_wait_agreed(session, ec, FORM_DEADLINE_S)
            follower = next(m for m in ec.members if m is not leader)
            version = (await etcd_status(session, leader.client_url) or {}).get("version")
            result["version"] = version
            print(
                f"etcd {version}: 3 members on {ec.members[0].ip}-{ec.members[-1].ip.rsplit('.', 1)[1]} "
                f"client port {ec.members[0].client_port} formed in {time.monotonic() - t0:.2f} s; "
                f"leader {leader.name} ({leader.ip}), follower {follower.name} ({follower.ip})",
                flush=True,
            )
            targets = {"leader": etcd_target(leader.client_url), "follower": etcd_target(follower.client_url)}
            watch = LeaderWatch(session, etcd_probe, [m.client_url for m in ec.members])
            pids = [m.proc.pid for m in ec.members if m.proc is not None]
            result["phases"] = await run_phases(session, targets, watch, args.clients, args, "etcd", pids)
            result["leader_changes"] = watch.changes()

            trials: list[float | None] = []
            for i in range(0 if args.skip_failover else args.trials):
                leader = await etcd_wait_agreed(session, ec, FORM_DEADLINE_S)
                all_targets = {m.client_url: etcd_target(m.client_url) for m in ec.members}

                async def kill(victim: EtcdMember = leader) -> float:
                    t = time.perf_counter()
                    assert victim.proc is not None
                    victim.proc.send_signal(signal.SIGKILL)
                    return t

                took = await light_load_until_survivor_write(
                    session, all_targets, kill, leader.client_url, args.failover_deadline
                )
                await asyncio.to_thread(leader.kill)
                trials.append(took)
                ec.start(leader)
                await etcd_wait_agreed(session, ec, FORM_DEADLINE_S)
                print(
                    f"  etcd failover trial {i + 1}/{args.trials}: "
                    f"{'timeout' if took is None else f'{took * 1000:.0f} ms'} "
                    f"(killed {leader.name}; restarted, healthy)",
                    flush=True,
                )
            result["failover"] = Failover(tuple(trials))
            if args.logs is not None:
                for m in ec.members:
                    m.kill()
                    with contextlib.suppress(OSError):
                        shutil.copy(m.log_path, log_dir / m.log_path.name)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return result


# --- putting it together ----------------------------------------------------------------------------------


def build_rows(
    counts: Sequence[int],
    tn: Mapping[tuple[str, int], PhaseStats],
    etcd: Mapping[tuple[str, int], PhaseStats],
) -> list[Row]:
    return [
        Row(path, n, tn.get((path, n)), etcd.get((path, n)))
        for path in ("leader", "follower")
        for n in counts
    ]


def median_rows(rounds: Sequence[Sequence[Row]]) -> list[Row]:
    """One row per (path, clients): the round whose TN/etcd ratio is the median of that row's rounds (the
    lower middle one for an even count), so its figures and its ratio come from the same moment. Rounds
    exist because the machine's speed drifts by tens of percent within minutes: a ratio is only fair
    between phases run close together, and alternating which system goes first cancels a steady drift."""
    out = []
    for position, first in enumerate(rounds[0]):
        candidates = [r[position] for r in rounds]
        measured = sorted((row for row in candidates if row.ratio is not None), key=lambda row: row.ratio)
        out.append(measured[(len(measured) - 1) // 2] if measured else first)
    return out


def format_rounds(rounds: Sequence[Sequence[Row]]) -> str:
    """Each row's TN/etcd ratio in every round, and the median the table and the musts use."""
    lines = ["TN/etcd ratio per round (the table above shows the median round of each row):"]
    for position, row in enumerate(rounds[0]):
        ratios = [r[position].ratio for r in rounds]
        cells = "  ".join(_fmt(x, ".2f", 5) for x in ratios)
        lines.append(f"  {row.path:<9} {row.clients:>3} clients: {cells}")
    return "\n".join(lines)


def interpreter() -> dict[str, Any]:
    """The Python that runs the nodes (they are started with this same interpreter) and the client.

    Its build moves every Talent Nest figure and hardly any of etcd's: on this project's machine a
    distribution build with libpython linked into the executable (Debian's python3.11, which the image
    runs) ran the nodes 10-15% faster than a ``--enable-shared`` build without profile-guided optimisation
    (pyenv's default). So the report says which one ran."""
    maps = Path("/proc/self/maps")
    shared = None
    with contextlib.suppress(OSError):
        shared = "libpython" in maps.read_text()
    return {
        "python": platform.python_version(),
        "executable": os.path.realpath(sys.executable),
        "libpython_shared": shared,
    }


def format_interpreter(info: Mapping[str, Any]) -> str:
    build = {True: "libpython shared", False: "libpython linked in", None: "libpython: unknown"}
    return f"interpreter: {info['executable']} (Python {info['python']}, {build[info['libpython_shared']]})"


def report_json(
    args: argparse.Namespace,
    rows: Sequence[Row],
    tn: Mapping[str, Any],
    etcd: Mapping[str, Any],
    musts: Sequence[Must],
    replicated: bool,
    etcd_skipped: str | None,
) -> dict[str, Any]:
    return {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": {**interpreter(), "machine": platform.machine(), "cpus": os.cpu_count()},
        "config": {
            "clients": list(args.clients),
            "seconds": args.seconds,
            "warmup_s": args.warmup,
            "trials": args.trials,
            "row_payload_bytes": ROW_PAYLOAD_BYTES,
        },
        "replicated": replicated,
        "label": None if replicated else PRE_REPLICATION_LABEL,
        "etcd_version": etcd.get("version"),
        "etcd_skipped": etcd_skipped,
        "rows": [
            {
                "path": r.path,
                "clients": r.clients,
                "talentnest": r.tn and asdict(r.tn),
                "etcd": r.etcd and asdict(r.etcd),
                "ratio": r.ratio,
            }
            for r in rows
        ],
        "failover_s": {
            "talentnest": list(tn["failover"].trials_s) if "failover" in tn else None,
            "etcd": list(etcd["failover"].trials_s) if "failover" in etcd else None,
        },
        "leader_changes": {"talentnest": tn.get("leader_changes"), "etcd": etcd.get("leader_changes")},
        "musts": [asdict(m) for m in musts],
    }


async def amain(args: argparse.Namespace) -> int:
    import aiohttp

    etcd_bin = None if args.skip_etcd else shutil.which(args.etcd_bin)
    etcd_skipped = None
    if args.skip_etcd:
        etcd_skipped = "--skip-etcd"
    elif etcd_bin is None:
        message = (
            f"etcd binary {args.etcd_bin!r} not found: the etcd side is skipped "
            "(install etcd 3.4, e.g. `apt-get install etcd-server`, or pass --etcd-bin)"
        )
        if args.require_etcd:
            print(f"error: {message} and --require-etcd was given", file=sys.stderr)
            return 2
        print(f"note: {message}", flush=True)
        etcd_skipped = "etcd binary not found"

    tmp = tempfile.TemporaryDirectory(prefix="cluster-bench-")
    log_dir = args.logs or Path(tmp.name)
    log_dir.mkdir(parents=True, exist_ok=True)
    tn: dict[str, Any] = {}
    etcd: dict[str, Any] = {}
    rounds: list[list[Row]] = []
    changes: dict[str, int | None] = {"tn": None, "etcd": None}
    try:
        connector = aiohttp.TCPConnector(limit=3 * FAILOVER_MAX_IN_FLIGHT + 100, limit_per_host=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            for number in range(args.rounds):
                # Failover trials in the first round only (they restart members; the ratio rounds need not).
                round_args = args
                if number > 0:
                    round_args = argparse.Namespace(**{**vars(args), "skip_failover": True})
                order = ("tn", "etcd") if number % 2 == 0 else ("etcd", "tn")
                if args.rounds > 1:
                    print(f"round {number + 1}/{args.rounds}: {' then '.join(order)}", flush=True)
                results: dict[str, dict[str, Any]] = {"tn": {}, "etcd": {}}
                for system in order:
                    if system == "tn":
                        results["tn"] = await bench_talentnest(session, round_args, log_dir)
                    elif etcd_bin is not None:
                        from tests.support.cluster import pick_subnet

                        results["etcd"] = await bench_etcd(
                            session, round_args, log_dir, etcd_bin, pick_subnet()
                        )
                for system, got in results.items():
                    seen = got.get("leader_changes")
                    if seen is not None:
                        changes[system] = (changes[system] or 0) + seen
                if number == 0:
                    tn, etcd = results["tn"], results["etcd"]
                phases = (results["tn"].get("phases", {}), results["etcd"].get("phases", {}))
                rounds.append(build_rows(args.clients, *phases))
    finally:
        tmp.cleanup()

    replicated = bool(tn.get("replicated"))
    tn = {**tn, "leader_changes": changes["tn"]}
    etcd = {**etcd, "leader_changes": changes["etcd"]} if etcd else etcd
    rows = median_rows(rounds)
    musts = evaluate_musts(rows, tn.get("failover"), etcd.get("failover"))
    print()
    print(
        f"writes of one ~{ROW_PAYLOAD_BYTES}-byte row/value per request, {args.seconds:g} s per phase after "
        f"{args.warmup:g} s warm-up; etcd {etcd.get('version') or '(not run)'}"
        + ("" if replicated else "\n" + PRE_REPLICATION_LABEL)
    )
    print(format_interpreter(interpreter()))
    print(format_table(rows))
    if len(rounds) > 1:
        print()
        print(format_rounds(rounds))
    print()
    print(format_failover(tn.get("failover"), etcd.get("failover")))
    print()
    print(format_leader_changes(tn.get("leader_changes"), etcd.get("leader_changes")))
    print()
    print(format_musts(musts, replicated))
    document = report_json(args, rows, tn, etcd, musts, replicated, etcd_skipped)
    document["rounds"] = [
        [{"path": r.path, "clients": r.clients, "ratio": r.ratio} for r in one] for one in rounds
    ]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(document, indent=2) + "\n")
    print(f"\nfigures written to {args.json}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return asyncio.run(amain(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
