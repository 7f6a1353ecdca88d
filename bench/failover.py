"""Failover figures for three real nodes on loopback with default settings (not a test).

    .venv/bin/python bench/failover.py                 # N=7 trials of each
    .venv/bin/python bench/failover.py --trials 15
    .venv/bin/python bench/failover.py --idle-minutes 10   # false suspicions of three idle nodes

Three nodes run on 127.0.S.2-4 with the same port and a test DNS server that answers SERVICE_NAME with the
running nodes (TTL 600, like Docker's embedded DNS). Every setting is the node's default (PROBE_INTERVAL
0.25 s, PROBE_TIMEOUT 0.5 s, FAILURE_THRESHOLD 3, DISCOVERY_INTERVAL 10 s, NODE_TIMEOUT 30 s).

Each trial stops the leader, measures the time until both survivors' /cluster/status name the next leader
(polled every --poll-ms, default 10 ms), then restarts the stopped node and measures its join: the time until
all three report all three nodes healthy, the restarted node leading. Join is given from the node's
node_started log line (what the cluster does) and from the spawn (adds interpreter start-up).

Idle mode counts peer_unhealthy events (false suspicions: every node is alive throughout) and leader
changes; the contract is zero over 10 minutes.
"""

from __future__ import annotations

import argparse
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.cluster import Cluster, node_id, parse_timestamp  # noqa: E402
from tests.support.wait import wait_until  # noqa: E402

AGREE_DEADLINE_S = 15.0  # a trial that takes longer than this is reported as failed


def survivors_agree(c: Cluster, survivors: list[str], leader: str) -> bool:
    want = node_id(leader)
    for st in c.statuses(survivors, timeout_s=0.25).values():
        if st is None or st.get("leader_id") != want:
            return False
    return True


def timed_agreement(c: Cluster, survivors: list[str], poll_s: float, t0: float) -> float:
    """Seconds from t0 (time.monotonic) until every survivor names the highest survivor as leader."""
    nxt = max(survivors, key=node_id)
    wait_until(
        lambda: survivors_agree(c, survivors, nxt),
        AGREE_DEADLINE_S,
        poll_s,
        what=f"{survivors} to agree on {nxt}",
        describe=lambda: c.describe(c.statuses(survivors)),
    )
    return time.monotonic() - t0


def restart_and_join(c: Cluster, ip: str, poll_s: float) -> tuple[float, float]:
    """Restart ip; return (seconds from its node_started, seconds from spawn) until all three agree."""
    node = c.start(ip)
    c.wait_agreed(c.ips, timeout_s=AGREE_DEADLINE_S, interval_s=poll_s)
    agreed = time.time()
    started = node.wait_events("node_started", all_runs=False)  # the line may trail the HTTP answer
    from_started = agreed - parse_timestamp(started[0]["timestamp"])
    return from_started, agreed - node.started_at


def stop_leader(c: Cluster, how: str) -> tuple[str, list[str], float]:
    leader = c.leader_ip()
    survivors = [ip for ip in c.ips if ip != leader]
    node = c.nodes[leader]
    t0 = time.monotonic()
    if how == "kill":
        node.send(signal.SIGKILL)
    else:
        node.send(signal.SIGTERM)
    return leader, survivors, t0


def fmt(values: list[float]) -> str:
    ms = [v * 1000 for v in values]
    return (
        f"median {statistics.median(ms):7.1f} ms   min {min(ms):7.1f} ms   max {max(ms):7.1f} ms   "
        f"(n={len(ms)}: {', '.join(f'{v:.0f}' for v in ms)})"
    )


def run_trials(c: Cluster, trials: int, poll_s: float) -> None:
    results: dict[str, list[float]] = {
        "kill": [],
        "term": [],
        "join_started": [],
        "join_spawn": [],
        "term_exit": [],
    }
    for how in ("kill", "term"):
        for i in range(trials):
            leader, survivors, t0 = stop_leader(c, how)
            took = timed_agreement(c, survivors, poll_s, t0)
            code = c.nodes[leader].wait_exit(5)
            if how == "term":
                results["term_exit"].append(time.monotonic() - t0)
                if code != 0:
                    print(f"  warning: SIGTERM exit status {code}", flush=True)
            c.publish_dns()  # the stopped node leaves the DNS answer, as a stopped container does
            results[how].append(took)
            from_started, from_spawn = restart_and_join(c, leader, poll_s)
            results["join_started"].append(from_started)
            results["join_spawn"].append(from_spawn)
            print(
                f"  {how:4} trial {i + 1}/{trials}: survivors agreed after {took * 1000:6.1f} ms; "
                f"restarted node joined and leads {from_started * 1000:6.1f} ms after node_started "
                f"({from_spawn * 1000:.0f} ms after spawn)",
                flush=True,
            )
    unhealthy = sum(len(n.events("peer_unhealthy")) for n in c.nodes.values())
    print()
    print(f"kill -9 of the leader -> survivors agree on the next:   {fmt(results['kill'])}")
    print(f"SIGTERM of the leader -> survivors agree on the next:   {fmt(results['term'])}")
    print(f"SIGTERM of the leader -> its process exited:            {fmt(results['term_exit'])}")
    print(f"restarted node joins and leads (from node_started):     {fmt(results['join_started'])}")
    print(f"restarted node joins and leads (from spawn):            {fmt(results['join_spawn'])}")
    print(f"peer_unhealthy events in all logs: {unhealthy} (expected: one per survivor per kill -9 trial)")
    problems = c.all_log_problems()
    print(f"log lines breaking the JSON-lines contract: {len(problems)}")


def run_idle(c: Cluster, minutes: float) -> None:
    elected_before = {ip: len(c.nodes[ip].events("leader_elected")) for ip in c.ips}
    duration = minutes * 60
    start = time.monotonic()
    checks = disagreements = 0
    next_report = 60.0
    for _ in range(int(duration) + 10):  # about one check a second, bounded
        elapsed = time.monotonic() - start
        if elapsed >= duration:
            break
        checks += 1
        if not Cluster.agreement(c.statuses(c.ips, timeout_s=1.0), c.ips, exact=True):
            disagreements += 1
        if elapsed >= next_report:
            suspicions = sum(len(n.events("peer_unhealthy")) for n in c.nodes.values())
            print(f"  {elapsed / 60:4.1f} min: {suspicions} peer_unhealthy so far", flush=True)
            next_report += 60.0
        time.sleep(min(1.0, max(0.0, duration - (time.monotonic() - start))))
    observed = time.monotonic() - start
    suspicions = [e for n in c.nodes.values() for e in n.events("peer_unhealthy")]
    changes = sum(len(c.nodes[ip].events("leader_elected")) - elected_before[ip] for ip in c.ips)
    alive = all(n.running for n in c.nodes.values())
    print()
    print(
        f"idle {observed / 60:.1f} min, 3 nodes: {len(suspicions)} false suspicions (peer_unhealthy), "
        f"{changes} leader changes, {disagreements}/{checks} status checks without full agreement, "
        f"all nodes alive: {alive}"
    )
    for event in suspicions:
        print(f"  {event}")
    print("contract (zero false suspicions):", "met" if not suspicions else "NOT MET")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trials", "-n", type=int, default=7, help="trials of each kind (default 7)")
    parser.add_argument("--poll-ms", type=float, default=10.0, help="status polling interval (default 10 ms)")
    parser.add_argument("--idle-minutes", type=float, default=None, help="idle mode: watch for M minutes")
    parser.add_argument("--logs", type=Path, default=None, help="keep node logs here (default: a temp dir)")
    args = parser.parse_args()
    if args.trials < 1 or args.poll_ms <= 0:
        parser.error("--trials must be >= 1 and --poll-ms > 0")

    with tempfile.TemporaryDirectory(prefix="failover-bench-") as tmp:
        log_dir = args.logs or Path(tmp)
        with Cluster(log_dir, size=3) as c:
            print(
                f"3 nodes on {c.ips[0]}-{c.ips[-1].rsplit('.', 1)[1]} port {c.port}, default settings, "
                f"test DNS (TTL {c.dns.ttl}); polling /cluster/status every {args.poll_ms:g} ms",
                flush=True,
            )
            formed = c.start_all(timeout_s=AGREE_DEADLINE_S)
            print(f"cluster formed: all three agree {formed * 1000:.0f} ms after the first start", flush=True)
            if args.idle_minutes is not None:
                run_idle(c, args.idle_minutes)
            else:
                run_trials(c, args.trials, args.poll_ms / 1000)
            for node in c.nodes.values():
                if node.running:
                    node.stop(signal.SIGTERM, timeout_s=5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
