#!/usr/bin/env python3
"""Ask every node for /cluster/status, wait until they agree, print one table.

    deploy/status.py [--expect N] [--wait SECONDS] [--host HOST] NAME=PORT ...

Standard library only (Python >= 3.8), so it runs with the host's python3 or inside the node image.
The cluster agrees when every node answers, sees ``--expect`` nodes, all of them healthy, and names the
same leader: the highest ID. With REPLICATION=on (the status carries ``commit_index``) it also needs exactly
one writable node and the same (cluster) epoch on every node, and the table adds each node's writable flag,
commit and applied index, and its voter flag and lag as the writable node sees them. Exit status: 0 agreed, 1 not within ``--wait`` seconds (the last view is
printed either way), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request

POLL_S = 0.25


def fetch(host: str, port: int, timeout_s: float = 2.0) -> dict | str:
    url = f"http://{host}:{port}/cluster/status"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return json.loads(response.read())
    except (OSError, ValueError) as exc:
        return f"no answer ({getattr(exc, 'reason', exc)})"


def agreement(views: dict[str, dict | str], expect: int) -> str | None:
    """None if the views agree, else what is still wrong."""
    for name, view in views.items():
        if isinstance(view, str):
            return f"{name}: {view}"
        # Unhealthy entries (a node that vanished without a goodbye) stay listed until NODE_TIMEOUT: they
        # cannot lead, so only the healthy count must match.
        if view.get("healthy_nodes") != expect:
            return f"{name} sees {view.get('healthy_nodes')}/{view.get('total_nodes')} healthy, expected {expect}"
    if replicated(views):
        problem = replication_agreement(views)
        if problem is not None:
            return problem
    leaders = {view["leader_id"] for view in views.values()}
    if len(leaders) != 1:
        return f"leaders differ: {sorted(leaders)}"
    highest = max(node["id"] for view in views.values() for node in view["nodes"] if node["healthy"])
    if leaders != {highest}:
        return f"leader {leaders.pop()} is not the highest ID {highest}"
    return None


def replicated(views: dict[str, dict | str]) -> bool:
    """True when any node reports the REPLICATION=on fields (older nodes and REPLICATION=off do not)."""
    return any(isinstance(view, dict) and "commit_index" in view for view in views.values())


def replication_agreement(views: dict[str, dict | str]) -> str | None:
    """With replication, agreement also means exactly one writable node and one cluster epoch everywhere:
    two writable nodes (or epochs that differ) is what a split brain or an unfinished election looks like."""
    answered = {name: view for name, view in views.items() if isinstance(view, dict)}
    missing = sorted(name for name, view in answered.items() if "commit_index" not in view)
    if missing:
        return f"{', '.join(missing)} report no replication fields (REPLICATION differs between nodes?)"
    writable = sorted(name for name, view in answered.items() if view.get("writable") is True)
    if len(writable) != 1:
        return f"{len(writable)} writable nodes ({', '.join(writable) or 'none'}), expected exactly 1"
    epochs = {name: view.get("epoch") for name, view in answered.items()}
    if len(set(epochs.values())) != 1:
        return "epochs differ: " + ", ".join(f"{name}={epoch}" for name, epoch in epochs.items())
    return None


def peer_facts(views: dict[str, dict | str]) -> dict[int, dict]:
    """Per node ID, its voter flag and lag: as the writable node sees them (only a leader knows every lag),
    else as each node sees itself."""
    facts: dict[int, dict] = {}
    for view in views.values():
        if isinstance(view, dict):
            for node in view.get("nodes", []):
                if node.get("id") == view.get("current_node_id"):
                    facts.setdefault(node["id"], node)
    for view in views.values():
        if isinstance(view, dict) and view.get("writable") is True:
            facts.update({node["id"]: node for node in view.get("nodes", []) if "id" in node})
    return facts


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def table(views: dict[str, dict | str], ports: dict[str, int]) -> str:
    extra = replicated(views)
    head = ("NODE", "PORT", "ID", "ROLE", "LEADER", "NODES", "HEALTHY", "EPOCH")
    head += ("WRITABLE", "COMMIT", "APPLIED", "VOTER", "LAG") if extra else ()
    rows = [(*head, "ADDRESS")]
    facts = peer_facts(views) if extra else {}
    for name, view in views.items():
        if isinstance(view, str):
            rows.append((name, str(ports[name]), "-", view, *([""] * (len(head) - 4)), ""))
            continue
        me = next((n for n in view["nodes"] if n["id"] == view["current_node_id"]), {})
        row = (
            name,
            str(ports[name]),
            str(view["current_node_id"]),
            view["current_role"],
            str(view["leader_id"]),
            str(view["total_nodes"]),
            str(view.get("healthy_nodes", "?")),
            str(view.get("epoch", "?")),
        )
        if extra:
            fact = facts.get(view["current_node_id"], {})
            row += (
                _cell(view.get("writable")),
                _cell(view.get("commit_index")),
                _cell(view.get("applied_index")),
                _cell(fact.get("voter")),
                _cell(fact.get("lag")),
            )
        rows.append((*row, me.get("address", "")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("nodes", nargs="+", metavar="NAME=PORT")
    parser.add_argument("--expect", type=int, help="cluster size (default: the number of nodes named)")
    parser.add_argument("--wait", type=float, default=0.0, help="seconds to wait for agreement")
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    ports: dict[str, int] = {}
    for item in args.nodes:
        name, sep, port = item.rpartition("=")
        if not sep or not port.isdigit():
            parser.error(f"{item!r} is not NAME=PORT")
        ports[name] = int(port)
    expect = args.expect or len(ports)
    started = time.monotonic()
    deadline = started + args.wait
    while True:
        views = {name: fetch(args.host, port) for name, port in ports.items()}
        problem = agreement(views, expect)
        if problem is None or time.monotonic() >= deadline:
            break
        time.sleep(POLL_S)
    print(table(views, ports))
    elapsed = time.monotonic() - started
    if problem is not None:
        print(f"\nno agreement after {elapsed:.1f} s: {problem}", file=sys.stderr)
        return 1
    stale = max(view["total_nodes"] - view["healthy_nodes"] for view in views.values())
    if stale:
        print(f"\n{stale} unhealthy entries still listed: they go after NODE_TIMEOUT (default 30 s)")
    leader = next(iter(views.values()))
    leader_name = next((n for n, v in views.items() if v["current_node_id"] == leader["leader_id"]), "?")
    print(
        f"\n{expect} nodes agree: leader {leader['leader_id']} ({leader_name}, {leader['leader_address']})"
        f" after {elapsed:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
