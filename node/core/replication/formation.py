"""Formation and merge decisions: which cluster this node belongs to, from what it knows of its peers. Pure.

The Replicator (``node.actors.replicator``) gathers the facts (its membership view, what each peer's
answer said: identity, member of a cluster, the leader it follows and that leader's ID, whether it holds
client data) and carries out the action; every rule is here, so it can be tried exhaustively.

Rules (what the README's formation section quotes):

* **An empty node** (no log, no configuration) waits ``FORMATION_WINDOW``, then at most one more window
  until every peer in its view is healthy and known by identity (``settled``). If a healthy peer belongs to
  a cluster it JOINs (the cluster's leader adds it as a learner, then promotes it). Otherwise the node with
  the highest ID among the healthy peers BOOTSTRAPs a cluster of one voter; the others JOIN (wait as
  joiners, re-deciding every second, since the highest may die before it bootstraps).
* **Another cluster** is a healthy peer that belongs to a cluster of another name (every cluster is named
  at bootstrap; see ``HardState.cluster``). A peer that does not say its cluster's name (an older
  release) is of another cluster when it is not in this node's configuration and follows a leader that is
  neither this node's leader nor in its configuration. Its nodes are kept out
  of the view given to the core, so no leader ever adds a node of another cluster as a learner (nothing is
  absorbed silently); only the rules below move a node from one cluster to another.
* **Clusters without client data merge by the leader rule.** A node holds client data when its log holds
  any COMMAND entry (committed or not) or its database holds any table; its cluster does when it or any
  healthy peer of the same cluster does (a lagging follower never leaves a cluster that has data). Facing another cluster:
  - both hold data: CONFLICT; neither moves; the node logs ``cluster_conflict`` and reports the other
    cluster's leader in /cluster/status;
  - only the other holds data: DISSOLVE (clear the log, which holds only configuration and epoch-start
    entries, and join the other cluster as a learner);
  - only this node holds data: STAY (the other dissolves);
  - neither: the cluster whose leader has the lower (ID, identity) DISSOLVEs into the other, so the merged
    cluster is led by the highest ID, as the leader rule says. A node that knows no leader of its own
    (an election under way, or its leader dissolved first) ranks by its own ID instead, so the rest of a
    dissolving cluster, which may have lost its quorum, follows its leader rather than wait forever.
* **Who recruits a joiner.** A node without a cluster is added (as a learner) only by the cluster that
  would win the rules above against every other cluster in sight: higher (holds data, leader ID, leader
  identity) first. Otherwise two leaders could both add the same joiner, and its log would mix two
  histories. A member whose cluster does not win keeps joiners out of the view it gives the core.
* The Replicator acts on DISSOLVE only when the same decision held on two checks in a row and its own
  log, read back, has no COMMAND entry (the exact test), so a follower that merely lags cannot dissolve.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass


class Action(enum.Enum):
    WAIT = "wait"  # empty node, still within the formation window(s)
    BOOTSTRAP = "bootstrap"
    JOIN = "join"  # empty node: wait to be added by a cluster's leader
    STAY = "stay"  # member: nothing to do
    DISSOLVE = "dissolve"  # member without data: clear the log and join the other cluster
    CONFLICT = "conflict"  # member with data facing another cluster with data: refuse, report


@dataclass(frozen=True, slots=True)
class Peer:
    """One peer of the membership view, as this node knows it."""

    node_id: int
    healthy: bool = True
    identity: str | None = None  # None: not known yet (its answer has not arrived)
    member: bool | None = None  # None: not known yet
    leader: str | None = None  # identity of the leader it follows (its own if it leads)
    leader_id: int = 0  # that leader's node ID as the peer knows it (0: none)
    data: bool = False  # holds client data
    cluster: str = ""  # the name of its cluster ("": none, or a release that did not name clusters)


@dataclass(frozen=True, slots=True)
class Me:
    node_id: int
    identity: str
    member: bool
    data: bool = False
    leader: str | None = None
    leader_id: int = 0
    config: frozenset[str] = frozenset()  # identities of this cluster's voters and learners
    cluster: str = ""  # this node's cluster name ("" if it has none)


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    other_leader: str | None = None  # the other cluster's leader (DISSOLVE, CONFLICT)
    other_leader_id: int = 0
    reason: str = ""


def settled(peers: Iterable[Peer]) -> bool:
    """Every peer of the view is healthy and known by identity and membership."""
    return all(p.healthy and p.identity is not None and p.member is not None for p in peers)


def decide_empty(my_id: int, peers: Iterable[Peer], *, window_over: bool) -> Decision:
    """An empty node's choice. ``window_over``: the formation window (and its extension) has passed."""
    healthy = [p for p in peers if p.healthy]
    if any(p.member for p in healthy):
        return Decision(Action.JOIN, reason="a healthy peer belongs to a cluster")
    if not window_over:
        return Decision(Action.WAIT)
    if all(p.node_id < my_id for p in healthy):
        return Decision(Action.BOOTSTRAP, reason="highest ID among the healthy peers")
    return Decision(Action.JOIN, reason="a higher ID is healthy; waiting to be added by it")


def is_foreign(me: Me, peer: Peer) -> bool:
    """The peer belongs to another cluster than this node's (see the module docstring). When both clusters
    are named the names decide: a node this cluster added as a learner before it joined another cluster
    is in this cluster's configuration, yet foreign, and must count as such or neither cluster moves."""
    if not me.member or not peer.healthy or not peer.member or peer.identity is None:
        return False
    if me.cluster and peer.cluster:
        return peer.cluster != me.cluster
    if peer.identity in me.config or peer.leader is None:
        return False
    return peer.leader != me.leader and peer.leader not in me.config and peer.leader != me.identity


def cluster_holds_data(me: Me, peers: Iterable[Peer]) -> bool:
    """This node's cluster holds data if this node does or any healthy peer of the same cluster says so: a
    follower that lags (no COMMAND entry yet) must not leave a cluster that has data."""
    if me.data:
        return True
    return any(p.healthy and p.member and p.data and _same_cluster(me, p) for p in peers)


def _same_cluster(me: Me, p: Peer) -> bool:
    if me.cluster and p.cluster:
        return p.cluster == me.cluster
    return p.identity in me.config or (p.leader is not None and p.leader == me.leader)


def _rank(leader_id: int, leader: str | None) -> tuple[int, str]:
    return (leader_id, leader or "")


def decide_member(me: Me, peers: Iterable[Peer]) -> Decision:
    """A member's choice facing the other clusters it can see: STAY, DISSOLVE or CONFLICT."""
    peers = list(peers)
    foreign = [p for p in peers if is_foreign(me, p)]
    if not foreign:
        return Decision(Action.STAY)
    if cluster_holds_data(me, peers):
        with_data = [p for p in foreign if p.data]
        if with_data:
            p = max(with_data, key=lambda p: _rank(p.leader_id, p.leader))
            return Decision(
                Action.CONFLICT, p.leader, p.leader_id, "both clusters hold client data: neither is merged"
            )
        return Decision(Action.STAY, reason="this cluster holds data; the other one merges into it")
    with_data = [p for p in foreign if p.data]
    if with_data:
        p = max(with_data, key=lambda p: _rank(p.leader_id, p.leader))
        return Decision(Action.DISSOLVE, p.leader, p.leader_id, "the other cluster holds data, this one none")
    mine = _rank(me.leader_id, me.leader) if me.leader is not None else _rank(me.node_id, me.identity)
    p = max(foreign, key=lambda p: _rank(p.leader_id, p.leader))
    if _rank(p.leader_id, p.leader) > mine:
        return Decision(
            Action.DISSOLVE, p.leader, p.leader_id, "neither holds data; the other's leader is higher"
        )
    return Decision(Action.STAY, reason="neither holds data; this cluster's leader is higher")


def _cluster_rank(data: bool, leader_id: int, leader: str | None) -> tuple[bool, int, str]:
    return (data, leader_id, leader or "")


def may_recruit(me: Me, peers: Iterable[Peer]) -> bool:
    """Whether this member's cluster may add nodes without a cluster: it outranks every other cluster
    in sight (see "Who recruits a joiner")."""
    if not me.member:
        return False
    peers = list(peers)
    data = cluster_holds_data(me, peers)
    mine = (
        _cluster_rank(data, me.leader_id, me.leader)
        if me.leader is not None
        else _cluster_rank(data, me.node_id, me.identity)
    )
    return all(_cluster_rank(p.data, p.leader_id, p.leader) < mine for p in peers if is_foreign(me, p))
