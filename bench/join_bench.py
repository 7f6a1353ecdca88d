"""A new node joins a loaded cluster by snapshot: time to voter and to lead, transfer rate, write pause, RSS.

Not a test: it asserts nothing and prints figures.

    .venv/bin/python bench/join_bench.py --mb 100
    .venv/bin/python bench/join_bench.py --mb 1000 --rate 0 --json join-1000.json
    .venv/bin/python bench/join_bench.py --mb 20 --json            # JSON on stdout after the table

Steps (real ``python -m node`` processes, the code of ``tests/support/cluster.py``):

1. Three nodes on 127.0.S.2-4 with REPLICATION=on form a cluster; their DATA_DIRs are in a temporary
   directory under ``--dir`` (default: the system's temporary directory; it needs about 3x ``--mb`` per
   node: database, snapshots, log).
2. **Fill**: ``users`` rows of realistic width (name, email, headline, location, skills, a bio of several
   hundred characters: about 900 bytes a row) are inserted through the leader, ``--batch-rows`` rows per
   ``/db/execute`` request (one log entry each), ``--fill-clients`` requests in flight, until the rows'
   bytes reach ``--mb`` MB.
3. **Snapshot**: the nodes run with SNAPSHOT_BYTES at a quarter of the target (at most 256 MiB),
   SNAPSHOT_ENTRIES so high that the light load of step 4 never triggers one, SNAPSHOT_TRAILING=5 and
   LOG_SEGMENT_BYTES=8 MiB, so the fill is snapshotted and the log compacted as it goes. After the fill,
   payload that leaves no data (an insert and a delete of 1 MB in one request) is written until the
   leader's ``snapshot_index`` covers the last fill entry and its ``log_first_index`` is past entry 1: a
   new node then cannot catch up from the log and must take the snapshot. 300 one-row writes then push
   the fill's large entries out of the leader's in-memory window of applied entries (256), from which it
   would send a newcomer log entries instead of the snapshot.
4. **Join**: the peak-RSS counters of the three nodes are reset (``/proc/<pid>/clear_refs``), a writer
   starts (``--writers`` threads, one 1-row INSERT per request, round-robin over the three nodes, every
   acknowledgement's time recorded; bounded by ``--max-writes`` and the deadline), and a fourth node with
   the highest ID starts. It joins as a learner, downloads and installs the snapshot, catches up, is
   promoted to voter and, being the highest, takes the lead by planned handover.

Figures: from the newcomer's spawn (and from its ``node_started`` line, without interpreter start-up) to
being a voter (leader's ``/cluster/status`` ``nodes[].voter``) and to leading (its own status
``writable``); the transfer (bytes and seconds between its ``snapshot_transfer_start`` and
``snapshot_transfer_end`` lines, attempts) and the install (``snapshot_installed`` ``took_ms``); the
longest gap between consecutive acknowledged writes during the join and around the handover, beside a
baseline gap measured before the newcomer starts; the peak RSS (VmHWM) of the old leader and of the
newcomer over the join, and of the old leader over the fill. Run it at two sizes: the peaks must not grow
with the database.

Every loop is bounded in count and time; every process started is killed and the temporary directory
removed at the end, also on an error or Ctrl-C (``--keep DIR`` keeps data and logs there instead).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import http.client
import json
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from node import auth  # noqa: E402
from tests.support.cluster import Cluster, NodeProcess, node_id, parse_timestamp  # noqa: E402
from tests.support.wait import WaitTimeout, wait_until  # noqa: E402
from tests.support.writeload import WriteLoad, longest_gap_s  # noqa: E402

MB = 1_000_000
DEADLINE_S = 900.0  # the longest any one phase may take (a 1 GB fill on a busy machine is minutes)
JOIN_DEADLINE_S = 300.0  # spawn to voter, voter to leader: 1 GB at 10 MB/s is 100 s
PAD_BYTES = 1 << 20  # one padding request's payload
BASELINE_S = 2.0  # steady writes measured before the newcomer starts
WINDOW_WRITES = 300  # more than the leader's in-memory window of applied entries (keep_applied = 256)

SCHEMA = (
    "CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT NOT NULL, email TEXT NOT NULL, headline TEXT, "
    "location TEXT, skills TEXT, bio TEXT, created_at TEXT NOT NULL)"
)
INSERT = "INSERT INTO users VALUES (?, ?, ?, ?, ?, ?, ?, ?)"

FIRST = "Ada Alan Grace Linus Barbara Ken Margaret Dennis Frances Edsger Radia John Sophie Tim Hedy".split()
LAST = (
    "Lovelace Turing Hopper Torvalds Liskov Thompson Hamilton Ritchie Allen Dijkstra Perlman Backus".split()
)
CITIES = "Lisbon Berlin Nairobi Toronto Osaka Austin Warsaw Lyon Porto Accra Seoul Bogota Leeds Oslo".split()
SKILLS = (
    "python go rust sql postgres sqlite kubernetes terraform react typescript java kotlin swift "
    "ml statistics design product leadership mentoring distributed-systems security networking"
).split()
WORDS = (
    "built shipped led designed maintained scaled migrated mentored a the team platform service pipeline "
    "payments search billing infrastructure mobile web data analytics from to with across for at over "
    "million users requests latency reliability customers features engineers years startup company "
    "open-source community growth performance on-call incident review testing deployment automation"
).split()


# --- data --------------------------------------------------------------------------------------------------


def paragraphs(count: int, rng: random.Random) -> list[str]:
    """A pool of sentences to build bios from (building each bio word by word would make the fill of 1 GB
    CPU-bound in this process)."""
    out = []
    for _ in range(count):
        words = rng.choices(WORDS, k=rng.randint(45, 75))
        out.append(" ".join(words).capitalize() + ".")
    return out


def rows(first_id: int, count: int, pool: list[str], rng: random.Random) -> list[list[Any]]:
    """``count`` users rows as /db/execute statements; a row's text is about 900 bytes."""
    out = []
    for i in range(first_id, first_id + count):
        first, last = rng.choice(FIRST), rng.choice(LAST)
        bio = f"{pool[rng.randrange(len(pool))]} {pool[rng.randrange(len(pool))]}"
        out.append(
            [
                INSERT,
                i,
                f"{first} {last}",
                f"{first.lower()}.{last.lower()}{i}@example.org",
                f"Senior {rng.choice(SKILLS)} engineer at company {i % 9973}",
                f"{rng.choice(CITIES)}, {rng.choice(CITIES)} region",
                ",".join(rng.sample(SKILLS, 6)),
                bio,
                f"2025-{1 + i % 12:02d}-{1 + i % 28:02d}T{i % 24:02d}:{i % 60:02d}:00Z",
            ]
        )
    return out


def row_bytes(row: list[Any]) -> int:
    return sum(len(v) if isinstance(v, str) else 8 for v in row[1:])


# --- HTTP --------------------------------------------------------------------------------------------------


class Client:
    """One kept-alive connection; POST JSON, return (status, parsed body or None)."""

    def __init__(self, address: str, token: str, timeout_s: float = 60.0) -> None:
        self.address = address
        self.token = token
        self.timeout_s = timeout_s
        self.conn: http.client.HTTPConnection | None = None

    def post(self, path: str, body: Any) -> tuple[int, Any]:
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {self.token}"}
        try:
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.address, timeout=self.timeout_s)
            self.conn.request("POST", path, data, headers)
            resp = self.conn.getresponse()
            raw = resp.read()
        except (OSError, http.client.HTTPException):
            self.close()
            return 0, None
        try:
            return resp.status, json.loads(raw)
        except ValueError:
            return resp.status, None

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def execute_ok(status: int, body: Any) -> bool:
    try:
        return status == 200 and all("error" not in r for r in body["results"])
    except (TypeError, KeyError):
        return False


def last_index(c: Cluster, ip: str) -> int:
    st = c.nodes[ip].status(2.0) or {}
    return int(st.get("last_index") or st.get("commit_index") or 0)


# --- /proc -------------------------------------------------------------------------------------------------


def proc_status_kib(pid: int, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def reset_peak(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so a peak read later is the peak since now."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class RssSampler:
    """Samples VmRSS of some processes every 50 ms (a check on VmHWM, and the only figure where clear_refs
    is refused). Bounded by stop() and by its own count."""

    def __init__(self, pids: dict[str, int], max_samples: int = 200_000) -> None:
        self.pids = pids
        self.peak_kib = dict.fromkeys(pids, 0)
        self._stop = threading.Event()
        self._max = max_samples
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss-sampler")

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        for _ in range(self._max):
            for name, pid in self.pids.items():
                kib = proc_status_kib(pid, "VmRSS")
                if kib is not None:
                    self.peak_kib[name] = max(self.peak_kib[name], kib)
            if self._stop.wait(0.05):
                return


# --- phases ------------------------------------------------------------------------------------------------


def fill(c: Cluster, leader: str, token: str, target_bytes: int, batch_rows: int, clients: int) -> dict:
    """Insert users rows through the leader until their bytes reach target_bytes; return figures."""
    rng = random.Random(7)
    pool = paragraphs(4000, rng)
    lock = threading.Lock()
    state = {"next_id": 1, "bytes": 0, "rows": 0, "requests": 0, "failures": 0}
    errors: list[str] = []
    started = time.monotonic()
    deadline = started + DEADLINE_S
    max_requests = target_bytes // (batch_rows * 400) + 100  # rows are > 400 bytes: a bound, not a goal

    def worker(number: int) -> None:
        client = Client(c.nodes[leader].address, token)
        local_rng = random.Random(number)
        try:
            for _ in range(max_requests):
                with lock:
                    if state["bytes"] >= target_bytes or errors or time.monotonic() > deadline:
                        return
                    first = state["next_id"]
                    state["next_id"] += batch_rows
                batch = rows(first, batch_rows, pool, local_rng)
                size = sum(row_bytes(r) for r in batch)
                for _attempt in range(20):
                    status, body = client.post("/db/execute", batch)
                    if execute_ok(status, body):
                        break
                    with lock:
                        state["failures"] += 1
                    time.sleep(0.2)  # 503 busy or a moment without a leader: retry the same batch
                else:
                    errors.append(f"batch at id {first}: HTTP {status} {str(body)[:300]}")
                    return
                with lock:
                    state["bytes"] += size
                    state["rows"] += batch_rows
                    state["requests"] += 1
        finally:
            client.close()

    threads = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(clients)]
    last_report = started
    for t in threads:
        t.start()
    for t in threads:
        while t.is_alive() and time.monotonic() < deadline + 60:
            t.join(timeout=1.0)
            if time.monotonic() - last_report >= 10:
                last_report = time.monotonic()
                with lock:
                    done = state["bytes"]
                print(f"  fill: {done / MB:.0f} of {target_bytes / MB:.0f} MB", flush=True)
    if errors:
        raise RuntimeError(f"fill failed: {errors[0]}")
    elapsed = time.monotonic() - started
    return {**state, "seconds": elapsed, "mb_s": state["bytes"] / MB / elapsed}


def pad_until_snapshot(c: Cluster, leader: str, token: str, covered: int, limit_bytes: int) -> dict:
    """Write payload that leaves no rows (an insert and a delete in one request) until the leader starts a
    snapshot past index ``covered``, then wait until it is taken and the log no longer starts at 1. Padding
    stops when the snapshot begins, not when it is taken: copying 1 GB takes tens of seconds, and what is
    written meanwhile is log after the snapshot that the newcomer would then receive as entries."""
    client = Client(c.nodes[leader].address, token)
    status, body = client.post("/db/execute", [["CREATE TABLE IF NOT EXISTS pad (v TEXT)"]])
    if not execute_ok(status, body):
        raise RuntimeError(f"creating pad: HTTP {status} {body}")
    blob = "x" * PAD_BYTES
    sent = 0
    started = time.monotonic()
    try:
        for _ in range(limit_bytes // PAD_BYTES + 2000):
            st = c.nodes[leader].status(2.0) or {}
            if st.get("snapshot_index", 0) >= covered and st.get("log_first_index", 1) > 1:
                return {"pad_bytes": sent, "seconds": time.monotonic() - started, "status": st}
            if time.monotonic() - started > DEADLINE_S:
                break
            if sent < limit_bytes and not snapshot_begun(c.nodes[leader], covered):
                status, body = client.post(
                    "/db/execute", [["INSERT INTO pad VALUES (?)", blob], ["DELETE FROM pad"]]
                )
                if execute_ok(status, body):
                    sent += PAD_BYTES
                continue
            time.sleep(0.2)  # enough written: the snapshot is being taken
    finally:
        client.close()
    raise RuntimeError(f"no snapshot covering index {covered} after {sent} padding bytes: {st}")


def flush_window(c: Cluster, token: str, count: int, threads: int = 4) -> float:
    """Write ``count`` 1-row entries so that the leader's window of applied entries kept in memory
    (``keep_applied``, 256) holds only small ones: a newcomer is then further behind than that window and
    must take the snapshot (from the window the leader would send the fill's large entries as log)."""
    lock = threading.Lock()
    left = [count]
    started = time.monotonic()

    def worker(number: int) -> None:
        client = Client(c.nodes[c.ips[-1]].address, token, timeout_s=15)
        try:
            for attempt in range(count * 5):
                with lock:
                    if left[0] <= 0 or time.monotonic() - started > DEADLINE_S:
                        return
                status, body = client.post("/db/execute", [["INSERT INTO t (v) VALUES (?)", -attempt]])
                if execute_ok(status, body):
                    with lock:
                        left[0] -= 1
        finally:
            client.close()

    workers = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(timeout=DEADLINE_S)
    if left[0] > 0:
        raise RuntimeError(f"{left[0]} of {count} window writes were not acknowledged")
    return time.monotonic() - started


def wait_or_none(predicate: Any, what: str, out: dict) -> float | None:
    """wait_until for JOIN_DEADLINE_S; on a timeout None, noted in ``out`` (the figures so far still count)."""
    try:
        return wait_until(predicate, JOIN_DEADLINE_S, 0.05, what=what)
    except WaitTimeout:
        out["timed_out"] = f"{what} (after {JOIN_DEADLINE_S:g} s)"
        return None


def snapshot_begun(node: NodeProcess, covered: int) -> bool:
    """The node logged that a snapshot at or past index ``covered`` is due (it is being taken)."""
    return any(e.get("applied", 0) >= covered for e in node.events("replication_snapshot_due"))


def newcomer_is_voter(c: Cluster, asked: list[str], newcomer_id: int) -> bool:
    """Whether the leader of the moment lists the newcomer as a voter. The newcomer is asked too: promotion
    and handover may fall between two polls, and then it is the writable one."""
    for ip in asked:
        st = c.nodes[ip].status()
        if st and st.get("writable"):
            return any(n.get("id") == newcomer_id and n.get("voter") for n in st.get("nodes", []))
    return False


def transfer_figures(node: NodeProcess) -> dict:
    events = node.events(all_runs=False)
    starts = [e for e in events if e.get("event") == "snapshot_transfer_start"]
    ends = [e for e in events if e.get("event") == "snapshot_transfer_end"]
    installed = [e for e in events if e.get("event") == "snapshot_installed"]
    out: dict[str, Any] = {
        "attempts": len(starts),
        "outcomes": [e.get("outcome") for e in ends],
        "fetch_failures": [e.get("reason") for e in events if e.get("event") == "snapshot_fetch_failed"],
        "installed": bool(installed),
    }
    done = [e for e in ends if e.get("outcome") == "done"]
    if starts and done:
        t0 = parse_timestamp(starts[0]["timestamp"])
        t1 = parse_timestamp(done[-1]["timestamp"])
        out["bytes"] = int(done[-1]["total"])
        out["seconds"] = t1 - t0
        out["mb_s"] = out["bytes"] / MB / out["seconds"] if out["seconds"] > 0 else None
        out["start_after_spawn_s"] = t0 - node.started_at
    if installed:
        out["install_ms"] = installed[-1].get("took_ms")
    return out


def gap_start_s(acks: list, start_s: float, end_s: float) -> float:
    """When (seconds after start_s) the longest gap between acknowledgements in the window began."""
    times = sorted([start_s, *(a.acked_s for a in acks if start_s < a.acked_s < end_s), end_s])
    gaps = [(b - a, a) for a, b in zip(times, times[1:], strict=False)]
    return max(gaps)[1] - start_s


def started_mono(node: NodeProcess) -> float | None:
    """time.monotonic() of the node's node_started line (its own clock: interpreter start-up excluded)."""
    lines = node.events("node_started", all_runs=False)
    if not lines:
        return None
    return parse_timestamp(lines[-1]["timestamp"]) - time.time() + time.monotonic()


def join(c: Cluster, token: str, writers: int, max_writes: int, settle_s: float) -> dict:
    old_leader = c.ips[-1]
    pids = {ip: c.nodes[ip].proc.pid for ip in c.ips}  # type: ignore[union-attr]
    peaks_reset = all(reset_peak(pid) for pid in pids.values())
    rss_before = {ip: proc_status_kib(pid, "VmRSS") for ip, pid in pids.items()}
    load = WriteLoad(
        lambda: [f"http://{ip}:{c.port}" for ip in c.ips], token, threads=writers, max_writes=max_writes
    )
    out: dict[str, Any] = {"peaks_reset": peaks_reset}
    load.start()
    sampler: RssSampler | None = None
    try:
        wait_until(lambda: len(load.snapshot()[0]) >= 20, 60, what="the writer's first acknowledgements")
        time.sleep(BASELINE_S)  # a steady window to read the join's pauses against
        acks, _ = load.snapshot()
        now = time.monotonic()
        out["baseline_gap_s"] = longest_gap_s(acks, now - BASELINE_S, now)
        base_acks = [a for a in acks if a.acked_s > now - BASELINE_S]
        out["baseline_writes_s"] = len(base_acks) / BASELINE_S

        newcomer = c.spare_ip()
        c.add_node(newcomer)
        t0 = time.monotonic()
        node = c.start(newcomer)
        sampler = RssSampler({"old_leader": pids[old_leader], "newcomer": node.proc.pid}).start()  # type: ignore[union-attr]
        nid = node_id(newcomer)
        voter_at = wait_or_none(
            lambda: time.monotonic() if newcomer_is_voter(c, [*c.ips, newcomer], nid) else None,
            "the newcomer to be a voter", out,
        )  # fmt: skip
        lead_at = None
        if voter_at is not None:
            lead_at = wait_or_none(
                lambda: time.monotonic() if (node.status() or {}).get("writable") else None,
                "the newcomer to lead", out,
            )  # fmt: skip
        # Writes keep going for a while after the handover, so a pause right after it is seen.
        time.sleep(settle_s)
        end = time.monotonic()
        load.stop()
        sampler.stop()
        acks, fails = load.snapshot()
        boot = started_mono(node)
        joined = voter_at if voter_at is not None else end
        out.update(
            {
                "to_voter_s": None if voter_at is None else voter_at - t0,
                "to_lead_s": None if lead_at is None else lead_at - t0,
                "started_to_voter_s": None if boot is None or voter_at is None else voter_at - boot,
                "started_to_lead_s": None if boot is None or lead_at is None else lead_at - boot,
                "join_gap_s": longest_gap_s(acks, t0, joined),
                "join_gap_at_s": gap_start_s(acks, t0, joined),
                "handover_gap_s": longest_gap_s(acks, joined, end) if joined < end else None,
                "handover_gap_at_s": gap_start_s(acks, joined, end) + joined - t0 if joined < end else None,
                "writes_acked": len([a for a in acks if a.acked_s >= t0]),
                "writes_failed": len([f for f in fails if f.at_s >= t0]),
                "failure_codes": dict(
                    collections.Counter(f"{f.status} {f.code}".strip() for f in fails if f.at_s >= t0)
                ),
                "transfer": transfer_figures(node),
                "led_by_handover": any(
                    c.nodes[ip].events("replication_takeover_requested", all_runs=False) for ip in c.ips
                )
                or bool(node.events("replication_takeover_requested", all_runs=False)),
            }
        )
        out["rss_kib"] = {
            "old_leader_before": rss_before[old_leader],
            "old_leader_peak": proc_status_kib(pids[old_leader], "VmHWM"),
            "newcomer_peak": proc_status_kib(node.proc.pid, "VmHWM"),  # type: ignore[union-attr]
            "old_leader_sampled_peak": sampler.peak_kib["old_leader"],
            "newcomer_sampled_peak": sampler.peak_kib["newcomer"],
            "followers_peak": {ip: proc_status_kib(pids[ip], "VmHWM") for ip in c.ips[:-1]},
        }
    finally:
        with contextlib.suppress(RuntimeError):
            load.stop()
        if sampler is not None:
            sampler.stop()
    return out


# --- output ------------------------------------------------------------------------------------------------


def mib(kib: int | None) -> str:
    return "?" if kib is None else f"{kib / 1024:.0f} MiB"


def secs(value: float | None) -> str:
    return "       - s" if value is None else f"{value:8.2f} s"


def ms(value: float | None) -> str:
    return "       - ms" if value is None else f"{value * 1000:8.0f} ms"


def report(r: dict) -> None:
    f, j = r["fill"], r["join"]
    t = j["transfer"]
    print()
    print(f"data: {f['rows']} rows, {f['bytes'] / MB:.0f} MB of row text in {f['seconds']:.1f} s "
          f"({f['mb_s']:.1f} MB/s, {f['requests']} requests, {f['failures']} retried); snapshot "
          f"{r['snapshot']['bytes'] / MB:.0f} MB at index {r['snapshot']['index']}, log from "
          f"{r['snapshot']['log_first_index']}; {r['pad']['pad_bytes'] / MB:.0f} MB of padding")  # fmt: skip
    print(f"SNAPSHOT_RATE_BYTES_S: {r['rate']}")
    print(f"steady writes before the join: {j['baseline_writes_s']:.0f}/s, longest gap "
          f"{j['baseline_gap_s'] * 1000:.0f} ms in {BASELINE_S:.0f} s")  # fmt: skip
    if j.get("timed_out"):
        print(f"TIMED OUT waiting for {j['timed_out']}: the figures below are up to then")
    print(f"newcomer spawn -> voter:          {secs(j['to_voter_s'])}   (from its node_started: "
          f"{secs(j['started_to_voter_s'])})")  # fmt: skip
    print(f"newcomer spawn -> leader:         {secs(j['to_lead_s'])}   (from its node_started: "
          f"{secs(j['started_to_lead_s'])}; handover={j['led_by_handover']})")  # fmt: skip
    if "mb_s" in t:
        print(f"snapshot transfer:                {t['bytes'] / MB:8.0f} MB in {t['seconds']:.2f} s = "
              f"{t['mb_s']:.0f} MB/s from {t['start_after_spawn_s']:.2f} s after spawn ({t['attempts']} "
              f"attempt(s), outcomes {t['outcomes']}); install "
              f"{t.get('install_ms')} ms")  # fmt: skip
    else:
        print(f"snapshot transfer: none completed ({t})")
    if t["fetch_failures"]:
        print(f"  fetch failures: {t['fetch_failures']}")
    print(f"longest write gap, join:          {j['join_gap_s'] * 1000:8.0f} ms   (from "
          f"{j['join_gap_at_s']:.2f} s after spawn)")  # fmt: skip
    print(f"longest write gap, handover:      {ms(j['handover_gap_s'])}   (from "
          f"{secs(j['handover_gap_at_s'])} after spawn; "
          f"{j['writes_acked']} writes acknowledged, {j['writes_failed']} failed since spawn: "
          f"{j['failure_codes'] or '-'})")  # fmt: skip
    rss = j["rss_kib"]
    print(f"peak RSS old leader, fill:        {mib(r['fill_rss_kib'])}")
    print(f"peak RSS old leader, join:        {mib(rss['old_leader_peak'])} (sampled "
          f"{mib(rss['old_leader_sampled_peak'])}, at the start {mib(rss['old_leader_before'])}; "
          f"reset={j['peaks_reset']})")  # fmt: skip
    print(f"peak RSS newcomer:                {mib(rss['newcomer_peak'])} (sampled "
          f"{mib(rss['newcomer_sampled_peak'])})")  # fmt: skip


# --- main --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def workspace(parent: Path | None, keep: Path | None) -> Iterator[Path]:
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        yield keep
        return
    path = Path(tempfile.mkdtemp(prefix="tn-join-", dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def run(args: argparse.Namespace, work: Path) -> dict:
    target = args.mb * MB
    snapshot_bytes = max(4 << 20, min(256 << 20, target // 4))
    env = {
        "REPLICATION": "on",
        "FORMATION_WINDOW": "1",
        "SNAPSHOT_ENTRIES": "10000000",
        "SNAPSHOT_BYTES": str(snapshot_bytes),
        "SNAPSHOT_TRAILING": "5",
        "LOG_SEGMENT_BYTES": str(8 << 20),
    }
    if args.rate is not None:
        env["SNAPSHOT_RATE_BYTES_S"] = str(args.rate)
    result: dict[str, Any] = {"mb": args.mb, "rate": args.rate if args.rate is not None else "default",
                              "snapshot_bytes_setting": snapshot_bytes, "dir": str(work)}  # fmt: skip
    with Cluster(work, env=env) as c:
        previous = signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        try:
            c.start_all(timeout_s=60)
            leader = c.ips[-1]
            token = auth.mint_jwt(c.jwt_secret, auth.Role.ADMIN, now=time.time(), ttl_s=24 * 3600)
            wait_until(lambda: (c.nodes[leader].status() or {}).get("writable"), 60, what="a writable leader")
            wait_until(
                lambda: all(
                    sum(1 for n in (c.nodes[ip].status() or {}).get("nodes", []) if n.get("voter")) == 3
                    for ip in c.ips
                ),
                60, what="three voters",
            )  # fmt: skip
            client = Client(c.nodes[leader].address, token)
            status, body = client.post("/db/execute", [[SCHEMA], ["CREATE TABLE t (v INTEGER)"]])
            client.close()
            if not execute_ok(status, body):
                raise RuntimeError(f"schema: HTTP {status} {body}")
            print(f"filling {args.mb} MB through {leader} ...", flush=True)
            result["fill"] = fill(c, leader, token, target, args.batch_rows, args.fill_clients)
            covered = last_index(c, leader)
            pad = pad_until_snapshot(c, leader, token, covered, snapshot_bytes + PAD_BYTES)
            st = pad.pop("status")
            result["pad"] = pad
            result["snapshot"] = {"index": st.get("snapshot_index"), "bytes": st.get("snapshot_bytes"),
                                  "log_first_index": st.get("log_first_index")}  # fmt: skip
            if args.window_writes:
                result["window_writes_s"] = flush_window(c, token, args.window_writes)
            result["fill_rss_kib"] = proc_status_kib(c.nodes[leader].proc.pid, "VmHWM")  # type: ignore[union-attr]
            print("joining a fourth node ...", flush=True)
            result["join"] = join(c, token, args.writers, args.max_writes, args.settle)
        except BaseException:
            for node in c.nodes.values():
                if node.starts:
                    print(node.tail(8), file=sys.stderr)
            raise
        finally:
            signal.signal(signal.SIGTERM, previous)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mb", type=int, default=100, help="data to fill, MB of row text (default 100)")
    parser.add_argument(
        "--rate",
        type=int,
        default=None,
        help="SNAPSHOT_RATE_BYTES_S for every node (bytes/s, 0 = unlimited; default: the node's)",
    )
    parser.add_argument(
        "--json",
        nargs="?",
        const="-",
        default=None,
        metavar="PATH",
        help="write the figures as JSON to PATH (no PATH: to stdout after the table)",
    )
    parser.add_argument("--dir", type=Path, default=None, help="parent of the temporary data directory")
    parser.add_argument("--keep", type=Path, default=None, help="keep data and logs in this directory")
    parser.add_argument("--batch-rows", type=int, default=1000, help="rows per fill request (<= 1000)")
    parser.add_argument("--fill-clients", type=int, default=2)
    parser.add_argument("--writers", type=int, default=1, help="threads of the 1-row writer during the join")
    parser.add_argument("--max-writes", type=int, default=200_000, help="cap per writer thread")
    parser.add_argument(
        "--window-writes", type=int, default=WINDOW_WRITES,
        help="1-row writes before the join (0: the newcomer may get the fill as log from the leader's memory)",
    )  # fmt: skip
    parser.add_argument("--settle", type=float, default=3.0, help="seconds of writes after the handover")
    args = parser.parse_args()  # fmt: skip
    if not 1 <= args.batch_rows <= 1000:
        parser.error("--batch-rows must be 1..1000 (DB_MAX_STATEMENTS)")
    try:
        with workspace(args.dir, args.keep) as work:
            result = run(args, work)
    except KeyboardInterrupt:
        print("interrupted: every node killed, data removed", file=sys.stderr)
        return 130
    report(result)
    status = 1 if result["join"].get("timed_out") else 0
    if args.json == "-":
        print(json.dumps(result, indent=2))
    elif args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
