"""Jepsen-style fault suite on real containers: a recorded workload under each fault, judged by checkers.

Workload (``node.check.workload``): clients through every node insert unique integers (a set) and read /
write / compare-and-set two registers (two clients per key, linearizable reads). Each fault runs while the
workload does; afterwards the cluster must heal by itself (every node a voter, one writable leader — the
highest ID), every node's tables must be identical, and the checkers must find nothing: no acknowledged insert
lost, nothing unexpected, linearizable registers, at most one acknowledging node per epoch, and no write
acknowledged by a node cut off from the majority. The table at the end of the run (and ``.faults/``) has the
figures per fault.

``FAULTS=long`` lengthens every fault and the random mix (``./tests/run tests/faults`` with it set); the
default is the short version CI runs. Every loop is bounded in count and time.
"""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time
from collections.abc import Callable

import aiohttp
import pytest

from node import auth
from node.check import history, report
from node.check.checkers import Isolation
from node.check.workload import Client, Recorder, Workload, WorkloadConfig
from tests.faults.conftest import keep_evidence, record
from tests.faults.harness import FaultCluster, wait_for

LONG = os.environ.get("FAULTS", "short").strip().lower() == "long"
WORKLOAD_S = 60.0 if LONG else 16.0
PAUSE_S = 20.0  # docker pause of the leader: longer than any timeout the nodes use
MIX_S = 300.0 if LONG else 45.0
HEAL_S = 90.0  # after a fault: the cluster must be whole again within this (liveness bound, not speed)
TAIL_S = 3.0  # workload kept running after the cluster is whole again
# Per test: the workload, the fault, healing and convergence are each bounded; this bounds their sum (and the
# image build of the first test) generously, so a loaded machine is not mistaken for a hang.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(int(MIX_S + 3 * HEAL_S + 600))]


def _leader(cluster: FaultCluster, slots: list[int]) -> int:
    return wait_for(lambda: (cluster.writable(slots) or [None])[0], 30, "a writable leader")


# Faults are marked once their docker command has acted (kill, stop, pause return then), so "first write
# after the fault" counts from the fault itself, not from when the command was issued.


def run_fault(
    cluster: FaultCluster,
    slots: list[int],
    fault: str,
    inject: Callable[[Recorder], list[Isolation]],
    duration_s: float = WORKLOAD_S,
    final_slots: list[int] | None = None,
) -> dict:
    """Run the workload for ``duration_s`` while ``inject`` (in a thread) applies and heals the fault; then wait
    for the cluster to heal, read every node's copy, judge, record the row, and return the verdict."""
    final_slots = final_slots or slots
    tok = auth.mint_jwt(cluster.env["JWT_SECRET"], auth.Role.WRITE, now=time.time(), ttl_s=3600)
    config = WorkloadConfig(
        urls=tuple(cluster.url(s) for s in slots),
        token=tok,
        duration_s=duration_s + HEAL_S + PAUSE_S + TAIL_S,  # an upper bound: stopped once healed (see main)
        max_ops=30_000,
        request_timeout_s=5.0,
        seed=hash(fault) & 0xFFFF,
    )
    recorder = Recorder()
    workload = Workload(config, recorder)
    isolations: list[Isolation] = []
    failure: list[BaseException] = []

    def fault_thread() -> None:
        try:
            isolations.extend(inject(recorder))
        except BaseException as e:  # noqa: BLE001 - re-raised in the test below
            failure.append(e)

    async def main() -> tuple[dict, float | None]:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            injector = threading.Thread(target=fault_thread, name=f"fault-{fault}")
            client = Client(config, session)
            await client.setup(workload.table, workload.keys, 60)
            async with asyncio.TaskGroup() as tg:
                running = tg.create_task(workload.run(session, setup_deadline_s=60))
                injector.start()
                # The workload goes on while the fault is applied, healed, and the cluster becomes whole again,
                # then for TAIL_S more: the figures cover the recovery, not just the fault.
                await asyncio.to_thread(injector.join, duration_s + HEAL_S + PAUSE_S)
                try:
                    assert not injector.is_alive(), "the fault script did not finish"
                    if failure:
                        raise failure[0]
                    await asyncio.to_thread(
                        wait_for,
                        lambda: cluster.healthy(final_slots) is None,
                        HEAL_S,
                        f"the cluster to heal after {fault}",
                        describe=lambda: cluster.healthy(final_slots),
                    )
                    await asyncio.sleep(TAIL_S)
                finally:
                    workload.stop()
                await running
            urls = [cluster.url(s) for s in final_slots]
            contents, converge_s = await report.converge(client, urls, workload.table, 60)
            return contents, converge_s

    try:
        contents, converge_s = asyncio.run(main())
    except BaseException as exc:
        # A fault script or a heal that never finished: the nodes' logs and views are the evidence, and the
        # containers lose them at teardown.
        keep_evidence(
            cluster, fault,
            {"error": repr(exc)[:2000], "status": {s: cluster.status(s) for s in final_slots}},
        )  # fmt: skip
        raise
    starts = [t for t, what in recorder.marks if what.startswith("fault:")]
    ends = [t for t, what in recorder.marks if what == "workload_end"]
    verdict = report.judge(
        recorder.ops,
        contents,
        initial={k: 0 for k in workload.keys},
        converge_s=converge_s,
        fault_start=starts[0] if starts else None,
        fault_end=ends[-1] if ends else None,
        isolations=isolations,
    )
    record(fault, verdict, history.dump_jsonl(recorder.ops))
    if not verdict["valid"]:
        # The evidence a failed verdict needs and the containers lose at teardown: each node's own log, and
        # what each node's copy held at the end.
        keep_evidence(cluster, fault, contents)
    return verdict


def _assert_valid(fault: str, verdict: dict) -> None:
    problems = {k: verdict[k] for k in ("set", "linearizable", "converged", "epochs", "isolated_acks")}
    assert verdict["valid"], f"{fault}: {problems}"
    assert verdict["operations"]["ok"] > 0


# ------------------------------------------------------------------------------------- single faults


def test_kill_9_of_the_leader(trio: FaultCluster) -> None:
    def inject(rec: Recorder) -> list[Isolation]:
        time.sleep(WORKLOAD_S / 4)
        leader = _leader(trio, [1, 2, 3])
        trio.kill(leader)
        rec.mark(f"fault: kill -9 slot {leader}")
        time.sleep(WORKLOAD_S / 4)
        trio.start(leader)
        rec.mark(f"healed: start slot {leader}")
        return []

    _assert_valid("kill -9 leader", run_fault(trio, [1, 2, 3], "kill-9-leader", inject))


def test_stop_and_start_of_the_leader(trio: FaultCluster) -> None:
    def inject(rec: Recorder) -> list[Isolation]:
        time.sleep(WORKLOAD_S / 4)
        leader = _leader(trio, [1, 2, 3])
        trio.stop(leader)
        rec.mark(f"fault: docker stop slot {leader}")
        time.sleep(WORKLOAD_S / 4)
        trio.start(leader)
        rec.mark(f"healed: docker start slot {leader}")
        return []

    _assert_valid("stop/start leader", run_fault(trio, [1, 2, 3], "stop-start-leader", inject))


def test_pause_of_the_leader(trio: FaultCluster) -> None:
    def inject(rec: Recorder) -> list[Isolation]:
        time.sleep(2)
        leader = _leader(trio, [1, 2, 3])
        trio.pause(leader)
        rec.mark(f"fault: docker pause slot {leader}")
        time.sleep(PAUSE_S)
        trio.unpause(leader)
        rec.mark(f"healed: docker unpause slot {leader}")
        return []

    verdict = run_fault(trio, [1, 2, 3], "pause-leader-20s", inject, duration_s=PAUSE_S + 8)
    _assert_valid("pause leader", verdict)


def test_a_follower_cut_off(trio: FaultCluster) -> None:
    def inject(rec: Recorder) -> list[Isolation]:
        time.sleep(WORKLOAD_S / 4)
        leader = _leader(trio, [1, 2, 3])
        follower = min(s for s in (1, 2, 3) if s != leader)
        others = [s for s in (1, 2, 3) if s != follower]
        trio.cut(follower, others)
        start = rec.mark(f"fault: cut slot {follower} from {others}")
        time.sleep(WORKLOAD_S / 3)
        end = rec.mark(f"healed: slot {follower}")
        trio.heal(follower)
        return [Isolation(str(trio.node_id(follower)), start, end)]

    _assert_valid("follower cut off", run_fault(trio, [1, 2, 3], "follower-cut-off", inject))


def test_the_leader_cut_into_a_minority(trio: FaultCluster) -> None:
    def inject(rec: Recorder) -> list[Isolation]:
        time.sleep(WORKLOAD_S / 4)
        leader = _leader(trio, [1, 2, 3])
        others = [s for s in (1, 2, 3) if s != leader]
        trio.cut(leader, others)
        start = rec.mark(f"fault: cut leader slot {leader} from {others}")
        time.sleep(WORKLOAD_S / 3)
        end = rec.mark(f"healed: slot {leader}")
        trio.heal(leader)
        return [Isolation(str(trio.node_id(leader)), start, end)]

    _assert_valid("leader in minority", run_fault(trio, [1, 2, 3], "leader-minority", inject))


def test_dns_dropped_for_one_node(trio: FaultCluster) -> None:
    def inject(rec: Recorder) -> list[Isolation]:
        time.sleep(WORKLOAD_S / 4)
        trio.drop_dns(1)
        rec.mark("fault: DNS dropped on slot 1")
        time.sleep(WORKLOAD_S / 2)
        rec.mark("healed: DNS on slot 1")
        trio.heal(1)
        return []

    _assert_valid("DNS dropped", run_fault(trio, [1, 2, 3], "dns-dropped", inject))


def test_restart_of_every_node_at_once(trio: FaultCluster) -> None:
    def inject(rec: Recorder) -> list[Isolation]:
        time.sleep(WORKLOAD_S / 4)
        rec.mark("fault: stop all")
        threads = [threading.Thread(target=trio.stop, args=(s,)) for s in (1, 2, 3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        for s in (1, 2, 3):
            trio.start(s)
        rec.mark("healed: started all")
        return []

    _assert_valid("restart all", run_fault(trio, [1, 2, 3], "restart-all", inject))


def test_random_mix_of_faults(trio: FaultCluster) -> None:
    rng = random.Random(int(os.environ.get("FAULTS_SEED", "7")))

    def inject(rec: Recorder) -> list[Isolation]:
        isolations: list[Isolation] = []
        deadline = time.monotonic() + MIX_S - 8
        rec.mark("fault: mix begins")
        for _ in range(200):  # bounded; the deadline normally ends it first
            if time.monotonic() > deadline:
                break
            slot = rng.choice([1, 2, 3])
            hold = rng.uniform(2, 6)
            kind = rng.choice(["kill", "stop", "pause", "cut", "cut-leader"])
            if kind == "cut-leader":
                slot = (trio.writable([1, 2, 3]) or [slot])[0]
            if kind == "kill":
                trio.kill(slot)
                time.sleep(hold)
                trio.start(slot)
            elif kind == "stop":
                trio.stop(slot)
                time.sleep(hold)
                trio.start(slot)
            elif kind == "pause":
                trio.pause(slot)
                time.sleep(hold)
                trio.unpause(slot)
            else:
                others = [s for s in (1, 2, 3) if s != slot]
                trio.cut(slot, others)
                start = rec.mark(f"cut slot {slot}")
                time.sleep(hold)
                end = rec.mark(f"heal slot {slot}")
                trio.heal(slot)
                isolations.append(Isolation(str(trio.node_id(slot)), start, end))
            rec.mark(f"{kind} slot {slot} for {hold:.1f}s")
            # Let the cluster become whole before the next fault, so faults never pile up into a lost majority.
            wait_for(lambda: trio.healthy([1, 2, 3]) is None, HEAL_S, f"healing after {kind} of slot {slot}")
        rec.mark("healed: mix ends")
        return isolations

    _assert_valid("random mix", run_fault(trio, [1, 2, 3], "random-mix", inject, duration_s=MIX_S))


def test_a_new_empty_node_with_the_highest_address_joins_under_load(trio: FaultCluster) -> None:
    newcomer = 200  # <subnet>.201: higher than every slot of the trio

    def inject(rec: Recorder) -> list[Isolation]:
        time.sleep(WORKLOAD_S / 4)
        rec.mark(f"fault: new node slot {newcomer}")
        trio.run(newcomer)
        slots = [1, 2, 3, newcomer]
        wait_for(
            lambda: trio.healthy(slots) is None, HEAL_S, "the newcomer to join and lead",
            describe=lambda: trio.healthy(slots),
        )  # fmt: skip
        rec.mark("healed: newcomer leads")
        return []

    verdict = run_fault(trio, [1, 2, 3], "new-highest-node", inject, final_slots=[1, 2, 3, newcomer])
    _assert_valid("new highest node", verdict)


def test_bridge_partition_with_five_nodes(docker, image) -> None:  # noqa: ANN001 - fixtures
    cluster = FaultCluster(docker, image)
    slots = [1, 2, 3, 4, 5]
    try:
        cluster.create_network()
        for s in slots:
            cluster.run(s)
        wait_for(lambda: cluster.healthy(slots) is None, 120, "five voters, the highest writable")

        def inject(rec: Recorder) -> list[Isolation]:
            time.sleep(WORKLOAD_S / 4)
            # {1, 2} and {4, 5} cannot see each other; 3 sees both halves (the bridge).
            for a in (1, 2):
                cluster.cut(a, [4, 5])
            for b in (4, 5):
                cluster.cut(b, [1, 2])
            rec.mark("fault: bridge {1,2} | 3 | {4,5}")
            time.sleep(WORKLOAD_S / 2)
            rec.mark("healed: bridge")
            cluster.heal()
            return []

        _assert_valid("bridge (5 nodes)", run_fault(cluster, slots, "bridge-5-nodes", inject))
    finally:
        cluster.destroy()
