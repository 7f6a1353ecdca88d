"""The workload and checkers of ``node.check`` against a real 3-node replicated cluster on loopback.

Two things are shown: the recorder and checkers judge a real cluster (no fault, then a kill -9 of the leader
halfway) as keeping every promise, and the checkers are not blind on real data — a history whose
acknowledged write is removed from the final picture is reported as lost. ``deploy/check`` is run as an
operator would, against the same cluster, and must exit 0 and leave no table behind.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

from node import auth
from node.check import report
from node.check.workload import Client, Recorder, Workload, WorkloadConfig
from tests.integration.test_replication import ENV, base, call, form, token, writable_node
from tests.support.cluster import Cluster
from tests.support.wait import wait_until

ROOT = Path(__file__).resolve().parents[2]


async def _run(c: Cluster, duration_s: float, fault=None) -> tuple[dict, dict, Workload]:
    urls = tuple(base(c, ip) for ip in c.ips)
    tok = auth.mint_jwt(c.jwt_secret, auth.Role.WRITE, now=time.time(), ttl_s=600)
    config = WorkloadConfig(urls=urls, token=tok, duration_s=duration_s, max_ops=4000, request_timeout_s=3)
    recorder = Recorder()
    workload = Workload(config, recorder)
    marks: dict[str, float] = {}

    async def inject() -> None:
        await asyncio.sleep(duration_s / 3)
        marks["start"] = recorder.mark("fault")
        await asyncio.to_thread(fault)
        marks["end"] = recorder.mark("fault done")

    async with aiohttp.ClientSession() as session:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(workload.run(session, setup_deadline_s=20))
            if fault:
                tg.create_task(inject())
        reachable = tuple(u for u in urls if c.nodes[u.split("//")[1].split(":")[0]].running)
        contents, converge_s = await report.converge(Client(config, session), reachable, workload.table, 30)
    verdict = report.judge(
        recorder.ops,
        contents,
        initial={k: 0 for k in workload.keys},
        converge_s=converge_s,
        fault_start=marks.get("start"),
        fault_end=marks.get("end"),
    )
    return verdict, contents, workload


def _formed(c: Cluster) -> None:
    form(c)
    wait_until(lambda: writable_node(c, c.ips) == c.ips[-1], 15, what="the highest to lead")


def test_a_healthy_cluster_keeps_every_promise_and_a_lost_write_would_be_seen(make_cluster):
    c: Cluster = make_cluster(env=ENV)
    _formed(c)
    verdict, contents, workload = asyncio.run(_run(c, 4))
    assert verdict["valid"], json.dumps(verdict, indent=2)
    assert verdict["operations"]["ok"] > 20 and verdict["set"]["acknowledged"] > 5
    assert verdict["epochs"]["unnamed"] == 0  # every acknowledged write named its epoch and node
    # Remove one acknowledged value from one node's picture: the same judge must call it lost.
    acknowledged = [op.value for op in workload.recorder.ops if op.f == "add" and op.outcome == "ok"]
    victim_node = next(iter(contents))
    doctored = {
        **contents,
        victim_node: {
            **contents[victim_node],
            "set": [v for v in contents[victim_node]["set"] if v != acknowledged[0]],
        },
    }
    bad = report.judge(
        workload.recorder.ops, doctored, initial={k: 0 for k in workload.keys}, converge_s=None
    )
    assert acknowledged[0] in bad["set"]["lost"] and not bad["valid"]


def test_kill_9_of_the_leader_mid_workload_keeps_every_promise(make_cluster):
    c: Cluster = make_cluster(env=ENV)
    _formed(c)
    leader = c.ips[-1]
    verdict, _, _ = asyncio.run(_run(c, 6, fault=lambda: c.kill9(leader)))
    assert verdict["valid"], json.dumps(verdict, indent=2)
    assert verdict["first_write_after_fault_s"] is not None  # the survivors took writes again


def test_deploy_check_runs_against_a_cluster_and_cleans_up(make_cluster, tmp_path):
    c: Cluster = make_cluster(env=ENV)
    _formed(c)
    tok = token(c)
    out = tmp_path / "check"
    proc = subprocess.run(
        [
            str(ROOT / "deploy" / "check"),
            "--duration",
            "3",
            "--max-ops",
            "1500",
            "--out",
            str(out),
            *(base(c, ip) for ip in c.ips),
        ],
        env={"PATH": "/usr/bin:/bin", "TN_TOKEN": tok, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "lost" in proc.stdout.splitlines()[0]  # the table's header
    written = json.loads((out / "report.json").read_text())
    assert written["valid"] is True
    assert (out / "history.jsonl").read_text().count("\n") == sum(written["operations"].values())
    status, _, body = call(
        f"{base(c, c.ips[0])}/db/query?level=strong&q=SELECT+name+FROM+sqlite_master", token=tok
    )
    assert status == 200
    assert not [row for row in body["results"][0].get("values", []) if row[0].startswith("tn_check_")]
