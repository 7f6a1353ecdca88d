"""Leader election: the highest node ID among healthy, eligible members leads.

A pure function of the latest view. Every node that holds the same view picks the same leader, so the
cluster agrees as soon as views agree (within a probe interval of any change, at the latest one discovery
round). Ties on the ID (two /16s, same last two octets) are broken on the endpoint so the answer stays
deterministic.

``step`` adds the bookkeeping around that choice: an epoch that increases with every change of leader
(in memory today; the replication work persists it and makes the leader's writes carry it), and the facts
the Elector logs (``leader_elected``, ``role_changed``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from node.core.membership import Member, View


class Role(enum.Enum):
    LEADER = "leader"
    FOLLOWER = "follower"


def elect(view: View) -> Member:
    """The member that leads this view. Self is always healthy in its own view, so there is always one."""
    candidates = [m for m in view.members if m.healthy and m.eligible]
    if not candidates:
        # Only reachable if this node itself is not eligible; it still reports someone rather than nobody.
        candidates = [m for m in view.members if m.is_self]
    return max(candidates, key=lambda m: (m.node_id, m.endpoint))


@dataclass(frozen=True, slots=True)
class Leadership:
    """The Elector's published decision: what /cluster/status reports."""

    epoch: int
    leader: Member
    view: View

    @property
    def role(self) -> Role:
        return Role.LEADER if self.leader.is_self else Role.FOLLOWER


@dataclass(frozen=True, slots=True)
class LeaderElected:
    previous_id: int | None
    leader_id: int
    leader_url: str
    epoch: int


@dataclass(frozen=True, slots=True)
class RoleChanged:
    previous: Role | None
    role: Role
    epoch: int


@dataclass(frozen=True, slots=True)
class NodeIdConflict:
    node_id: int
    endpoints: tuple[str, ...]


Fact = LeaderElected | RoleChanged | NodeIdConflict


def step(previous: Leadership | None, view: View) -> tuple[Leadership, list[Fact]]:
    """One election round on the newest view."""
    leader = elect(view)
    facts: list[Fact] = []
    changed = previous is None or previous.leader.endpoint != leader.endpoint
    epoch = (0 if previous is None else previous.epoch) + (1 if changed else 0)
    decision = Leadership(epoch=epoch, leader=leader, view=view)
    if changed:
        facts.append(
            LeaderElected(
                previous_id=None if previous is None else previous.leader.node_id,
                leader_id=leader.node_id,
                leader_url=leader.endpoint.url,
                epoch=epoch,
            )
        )
        previous_role = None if previous is None else previous.role
        if previous_role is not decision.role:
            facts.append(RoleChanged(previous_role, decision.role, epoch))
    if previous is None or previous.view.members != view.members:
        facts.extend(_conflicts(view))
    return decision, facts


def _conflicts(view: View) -> list[NodeIdConflict]:
    by_id: dict[int, list[str]] = {}
    for m in view.members:
        by_id.setdefault(m.node_id, []).append(str(m.endpoint))
    return [NodeIdConflict(i, tuple(eps)) for i, eps in sorted(by_id.items()) if len(eps) > 1]
