"""Planned-handover figures for three real nodes on loopback with REPLICATION=on (not a test).

    .venv/bin/python bench/handover.py                  # 5 trials
    .venv/bin/python bench/handover.py --trials 10 --behind 2000 --threads 4

Three nodes on 127.0.S.2-4 behind a test DNS server, default timings except REPLICATION=on and
FORMATION_WINDOW=1. A steady INSERT load (``--threads`` writers, each one request at a time, round-robin
over every running node, so most writes are forwarded by a follower) runs throughout. Each trial:

1. **stop**: SIGTERM to the leader (the highest ID). Measured: the process's exit time and status (the
   contract: status 0 within 2 s, what ``docker stop`` allows before SIGKILL is 10 s), the time from
   the signal to the first write acknowledged as executed by the successor (``X-TalentNest-Node``), and the
   longest gap between acknowledged writes around it. The successor's log says whether it took over by
   handover (``replication_takeover_requested``) or only after the failure-detection time.
2. **return**: after ``--behind`` more acknowledged writes, the stopped node restarts on the same DATA_DIR
   and, being the highest, takes the lead back by planned handover. Measured: the time from spawn to its
   first acknowledged write as leader (includes interpreter start-up and catch-up) and the longest gap
   between acknowledged writes in that window (the handover's pause).

After each phase every acknowledged value must be on every running node (``level=none`` reads); a missing
one is reported as LOST. Figures: median and max over the trials.
"""

from __future__ import annotations

import argparse
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from node import auth  # noqa: E402
from tests.support.cluster import Cluster, http_json, node_id, parse_timestamp  # noqa: E402
from tests.support.wait import wait_until  # noqa: E402
from tests.support.writeload import WriteLoad, longest_gap_s  # noqa: E402

ENV = {"REPLICATION": "on", "FORMATION_WINDOW": "1"}
DEADLINE_S = 30.0


def base(c: Cluster, ip: str) -> str:
    return f"http://{ip}:{c.port}"


def execute(c: Cluster, ip: str, tok: str, sql: str) -> int:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(
        f"{base(c, ip)}/db/execute",
        data=f'[["{sql}"]]'.encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {tok}"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def local_values(c: Cluster, ip: str, tok: str) -> set[int] | None:
    import json
    import urllib.request

    request = urllib.request.Request(
        f"{base(c, ip)}/db/query?level=none&q=SELECT+v+FROM+t", headers={"Authorization": f"Bearer {tok}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            result = json.loads(resp.read())["results"][0]
    except (OSError, ValueError, KeyError, IndexError):
        return None
    return {row[0] for row in result.get("values", [])}


def missing_on(c: Cluster, ips: list[str], tok: str, acked: set[int], timeout_s: float = 10.0) -> dict:
    """Acknowledged values absent from each node once it had timeout_s to apply them."""
    out: dict[str, int] = {}
    for ip in ips:
        try:
            wait_until(lambda ip=ip: (local_values(c, ip, tok) or set()) >= acked, timeout_s, 0.1)
        except AssertionError:
            pass
        have = local_values(c, ip, tok) or set()
        if not have >= acked:
            out[ip] = len(acked - have)
    return out


def writable(c: Cluster, ips: list[str]) -> str | None:
    for ip in ips:
        st = http_json(f"{base(c, ip)}/cluster/status")
        if st and st.get("writable"):
            return ip
    return None


def voters_everywhere(c: Cluster, count: int) -> bool:
    for ip in c.ips:
        st = c.nodes[ip].status()
        if not st or sum(1 for n in st.get("nodes", []) if n.get("voter")) != count:
            return False
    return True


def first_ack_by(load: WriteLoad, who: int, after_s: float) -> float | None:
    acks, _ = load.snapshot()
    times = [a.acked_s for a in acks if a.node_id == who and a.sent_s >= after_s]
    return min(times) if times else None


def slowest(fails: list, start_s: float, end_s: float) -> str:
    """The failed requests of a window that took longest: where a stalled client waited."""
    window = sorted((f for f in fails if start_s - 1 <= f.sent_s <= end_s), key=lambda f: f.sent_s - f.at_s)[
        :3
    ]
    return ", ".join(
        f"{f.target.split(':')[0]} {f.status} {f.code} {1000 * (f.at_s - f.sent_s):.0f} ms" for f in window
    )


def trial(c: Cluster, tok: str, load: WriteLoad, behind: int) -> dict[str, Any]:
    lowest, middle, highest = c.ips
    out: dict[str, Any] = {}
    wait_until(lambda: writable(c, c.ips) == highest, DEADLINE_S, what="the highest to lead")
    start_count = len(load.snapshot()[0])
    wait_until(lambda: len(load.snapshot()[0]) >= start_count + 100, DEADLINE_S, what="a steady load")

    # Baseline: the same figures with nothing happening (the longest gap of a 1 s window, the latency).
    acks, _ = load.snapshot()
    now = time.monotonic()
    out["baseline_gap_s"] = longest_gap_s(acks, now - 1.0, now)
    out["latency_s"] = statistics.median(a.acked_s - a.sent_s for a in acks if a.acked_s > now - 1.0)

    # 1. SIGTERM of the leader.
    node = c.nodes[highest]
    t0 = time.monotonic()
    node.send(signal.SIGTERM)
    try:
        out["exit_code"] = node.wait_exit(10)
    except subprocess.TimeoutExpired:
        node.kill()
        out["exit_code"] = "timeout"
    out["exit_s"] = time.monotonic() - t0
    c.publish_dns()
    first = wait_until(
        lambda: first_ack_by(load, node_id(middle), t0), DEADLINE_S, 0.005, what="a write by the successor"
    )
    out["stop_first_write_s"] = first - t0
    wait_until(lambda: len([a for a in load.snapshot()[0] if a.acked_s > first]) >= 50, DEADLINE_S)
    acks, fails = load.snapshot()
    out["stop_gap_s"] = longest_gap_s(acks, t0 - 0.05, first + 0.2)
    out["stop_failures"] = sum(1 for f in fails if t0 <= f.at_s <= first + 0.2)
    out["stop_slowest"] = slowest(fails, t0, first)
    acked = load.acked_values()
    out["stop_lost"] = missing_on(c, [lowest, middle], tok, acked)

    # 2. Behind by `behind` more writes, the highest returns and takes the lead back.
    count = len(load.snapshot()[0])
    wait_until(
        lambda: len(load.snapshot()[0]) >= count + behind, max(120, behind / 5), what="writes while away"
    )
    t1 = time.monotonic()
    c.start(highest)
    back = wait_until(
        lambda: first_ack_by(load, node_id(highest), t1), DEADLINE_S, 0.005, what="a write by the returned"
    )
    out["return_first_write_s"] = back - t1
    # The same from the node's node_started line: without the interpreter's start-up (seconds when the
    # machine is busy), i.e. what the cluster itself takes: discovery, catch-up, handover.
    started = c.nodes[highest].wait_events("node_started", all_runs=False, timeout_s=10)
    started_mono = parse_timestamp(started[-1]["timestamp"]) - time.time() + time.monotonic()
    out["return_from_started_s"] = back - started_mono
    wait_until(lambda: len([a for a in load.snapshot()[0] if a.acked_s > back]) >= 50, DEADLINE_S)
    acks, fails = load.snapshot()
    # The pause of the handover: the longest gap from the moment the new leader could have been asked
    # (it answers HTTP) until just after its first write.
    out["return_gap_s"] = longest_gap_s(acks, t1, back + 0.2)
    out["return_failures"] = sum(1 for f in fails if t1 <= f.at_s <= back + 0.2)
    out["return_slowest"] = slowest(fails, t1, back)
    out["return_lost"] = missing_on(c, c.ips, tok, load.acked_values())
    return out


def summary(name: str, values: list[float]) -> str:
    ms = [v * 1000 for v in values]
    return f"{name:<34} median {statistics.median(ms):8.1f} ms   max {max(ms):8.1f} ms   (n={len(ms)})"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--behind", type=int, default=200, help="writes acknowledged while the node is away")
    parser.add_argument(
        "--log-dir", type=Path, help="keep the nodes' logs and data here (default: temporary)"
    )
    args = parser.parse_args()
    results = []
    with (
        tempfile.TemporaryDirectory(prefix="tn-handover-") as tmp,
        Cluster(args.log_dir or Path(tmp), env=ENV) as c,
    ):
        c.start_all()
        wait_until(lambda: voters_everywhere(c, 3), DEADLINE_S, what="three voters")
        tok = auth.mint_jwt(c.jwt_secret, auth.Role.ADMIN, now=time.time(), ttl_s=24 * 3600)
        wait_until(lambda: writable(c, c.ips) is not None, DEADLINE_S, what="a writable leader")
        assert execute(c, c.ips[0], tok, "CREATE TABLE t (v INTEGER)") == 200
        load = WriteLoad(lambda: [base(c, ip) for ip in c.running_ips()], tok, threads=args.threads).start()
        try:
            for n in range(args.trials):
                takeovers_before = len(c.nodes[c.ips[1]].events("replication_takeover_requested"))
                r = trial(c, tok, load, args.behind)
                r["stop_by_handover"] = (
                    len(c.nodes[c.ips[1]].events("replication_takeover_requested")) > takeovers_before
                )
                results.append(r)
                print(
                    f"trial {n + 1}: exit {r['exit_code']} in {r['exit_s'] * 1000:.0f} ms; stop: first write by "
                    f"successor {r['stop_first_write_s'] * 1000:.0f} ms, longest gap {r['stop_gap_s'] * 1000:.0f}"
                    f" ms, {r['stop_failures']} failed writes, handover={r['stop_by_handover']}, lost="
                    f"{r['stop_lost'] or 0}; return: first write {r['return_first_write_s'] * 1000:.0f} ms "
                    f"after spawn, longest gap {r['return_gap_s'] * 1000:.0f} ms, {r['return_failures']} failed"
                    f" writes, lost={r['return_lost'] or 0}",
                    flush=True,
                )
                print(f"  slowest failed requests: stop [{r['stop_slowest']}] return [{r['return_slowest']}]")
        finally:
            load.stop()
        acks, fails = load.snapshot()
    print()
    print(f"{len(acks)} writes acknowledged, {len(fails)} failed (503/no answer) over {args.trials} trials")
    print(summary("steady: write latency", [r["latency_s"] for r in results]))
    print(summary("steady: longest gap in 1 s", [r["baseline_gap_s"] for r in results]))
    print(summary("SIGTERM -> process exit", [r["exit_s"] for r in results]))
    print(summary("SIGTERM -> first write by successor", [r["stop_first_write_s"] for r in results]))
    print(summary("stop: longest gap between writes", [r["stop_gap_s"] for r in results]))
    print(summary("restart -> first write by it", [r["return_first_write_s"] for r in results]))
    print(summary("node_started -> first write by it", [r["return_from_started_s"] for r in results]))
    print(summary("return: longest gap between writes", [r["return_gap_s"] for r in results]))
    print("exit codes:", sorted({str(r["exit_code"]) for r in results}))
    print("successor by handover:", sum(bool(r["stop_by_handover"]) for r in results), "of", len(results))
    lost = [r for r in results if r["stop_lost"] or r["return_lost"]]
    print("trials with a lost acknowledged write:", len(lost))
    return 1 if lost or any(r["exit_code"] != 0 for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
