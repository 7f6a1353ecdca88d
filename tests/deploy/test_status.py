"""deploy/status.py's pure functions: agreement with and without the REPLICATION=on fields, and the table."""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

_PATH = Path(__file__).resolve().parents[2] / "deploy" / "status.py"
_SPEC = importlib.util.spec_from_file_location("deploy_status", _PATH)
assert _SPEC is not None and _SPEC.loader is not None
status = importlib.util.module_from_spec(_SPEC)
sys.modules["deploy_status"] = status
_SPEC.loader.exec_module(status)

IDS = [2, 3, 4]


def view(
    me: int, *, replication: bool = False, epoch: int = 7, writable: bool | None = None
) -> dict[str, Any]:
    """A node's /cluster/status as documented, optionally with the replication fields."""
    nodes = [{"id": i, "address": f"10.0.0.{i}:3000", "healthy": True} for i in IDS]
    body: dict[str, Any] = {
        "current_node_id": me,
        "current_role": "leader" if me == max(IDS) else "follower",
        "leader_id": max(IDS),
        "leader_address": f"10.0.0.{max(IDS)}:3000",
        "total_nodes": len(nodes),
        "healthy_nodes": len(nodes),
        "epoch": epoch,
        "nodes": nodes,
    }
    if replication:
        leads = me == max(IDS)
        body.update(
            commit_index=40,
            applied_index=40 if leads else 39,
            writable=leads if writable is None else writable,
        )
        for node in nodes:
            node.update(voter=True, lag=(0 if node["id"] == me else 1) if leads else None)
    return body


def views(**kwargs: Any) -> dict[str, Any]:
    return {f"backend-{i}": view(i, **kwargs) for i in IDS}


PORTS = {f"backend-{i}": 3000 + i for i in IDS}


def test_without_replication_fields_agreement_and_table_are_unchanged() -> None:
    assert status.agreement(views(), 3) is None
    header = status.table(views(), PORTS).splitlines()[0].split()
    assert header == ["NODE", "PORT", "ID", "ROLE", "LEADER", "NODES", "HEALTHY", "EPOCH", "ADDRESS"]


def test_replicated_cluster_agrees_and_the_table_shows_the_replication_columns() -> None:
    healthy = views(replication=True)
    assert status.agreement(healthy, 3) is None
    lines = status.table(healthy, PORTS).splitlines()
    assert lines[0].split() == [
        "NODE", "PORT", "ID", "ROLE", "LEADER", "NODES", "HEALTHY", "EPOCH",
        "WRITABLE", "COMMIT", "APPLIED", "VOTER", "LAG", "ADDRESS",
    ]  # fmt: skip
    # Lags come from the writable node's view (followers report none): backend-2 is 1 behind.
    assert lines[1].split() == ["backend-2", "3002", "2", "follower", "4", "3", "3", "7", "no", "40", "39", "yes", "1",
                                "10.0.0.2:3000"]  # fmt: skip
    assert lines[3].split()[8:13] == ["yes", "40", "40", "yes", "0"]


def test_two_writable_nodes_or_none_is_no_agreement() -> None:
    split = views(replication=True)
    split["backend-3"]["writable"] = True
    assert "2 writable nodes" in status.agreement(split, 3)
    nobody = views(replication=True, writable=False)
    assert "0 writable nodes" in status.agreement(nobody, 3)


def test_different_epochs_are_no_agreement() -> None:
    apart = views(replication=True)
    apart["backend-2"]["epoch"] = 6
    assert "epochs differ" in status.agreement(apart, 3)


def test_a_node_without_replication_fields_among_replicated_ones_is_named() -> None:
    mixed = views(replication=True)
    mixed["backend-3"] = view(3)
    assert "backend-3" in status.agreement(mixed, 3)


def test_an_unanswering_node_gets_a_row_with_every_column() -> None:
    partial: dict[str, Any] = views(replication=True)
    partial["backend-2"] = "no answer (refused)"
    lines = status.table(partial, PORTS).splitlines()
    assert "no answer (refused)" in lines[1]
    assert status.agreement(partial, 3) == "backend-2: no answer (refused)"


@given(
    epochs=st.lists(st.integers(0, 3), min_size=3, max_size=3),
    writable=st.lists(st.booleans(), min_size=3, max_size=3),
    replication=st.booleans(),
)
def test_agreement_holds_exactly_when_one_writable_node_and_one_epoch(
    epochs: list[int], writable: list[bool], replication: bool
) -> None:
    """Every combination of epochs and writable flags: agreement iff (without replication) always, (with it)
    exactly one writable node and one epoch; and the table never fails and has one line per node."""
    generated = {}
    for i, epoch, flag in zip(IDS, epochs, writable, strict=True):
        generated[f"backend-{i}"] = view(i, replication=replication, epoch=epoch, writable=flag)
    expected = not replication or (sum(writable) == 1 and len(set(epochs)) == 1)
    original = copy.deepcopy(generated)
    assert (status.agreement(generated, 3) is None) is expected
    assert len(status.table(generated, PORTS).splitlines()) == 1 + len(IDS)
    assert generated == original  # pure: the views are not changed
