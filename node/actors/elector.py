"""Elector: runs an election round on every new view and publishes the decision.

It never works through a backlog: views arrive through a latest-value cell, so after a burst of membership
changes the next round sees only the newest view.
"""

from __future__ import annotations

from typing import Any

from node.core import election
from node.core.membership import View
from node.runtime.mailbox import LatestCell


class Elector:
    def __init__(self, *, views: LatestCell[View], decisions: LatestCell[election.Leadership], log: Any):
        self._views = views
        self._decisions = decisions
        self._log = log
        self.rounds = 0

    async def run(self) -> None:
        seen = 0
        decision: election.Leadership | None = None
        while True:
            seen, view = await self._views.wait_newer(seen)
            decision, facts = election.step(decision, view)
            self.rounds += 1
            self._decisions.publish(decision)
            self._log.debug(
                "election_round", leader_id=decision.leader.node_id, epoch=decision.epoch, view=view.version
            )
            for fact in facts:
                self._log_fact(fact)

    def _log_fact(self, fact: election.Fact) -> None:
        match fact:
            case election.LeaderElected():
                self._log.info(
                    "leader_elected",
                    previous_leader_id=fact.previous_id,
                    leader_id=fact.leader_id,
                    leader_address=fact.leader_url,
                    epoch=fact.epoch,
                )
            case election.RoleChanged():
                self._log.info(
                    "role_changed",
                    previous_role=None if fact.previous is None else fact.previous.value,
                    role=fact.role.value,
                    epoch=fact.epoch,
                )
            case election.NodeIdConflict():
                self._log.warning("node_id_conflict", conflicting_id=fact.node_id, endpoints=list(fact.endpoints))
