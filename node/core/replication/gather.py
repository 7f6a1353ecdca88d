"""When a leader's submitted writes enter the log: at once, or after gathering others for a moment (pure).

Every round of replication has a cost that does not depend on how many writes it carries: the core's steps,
the leader's log write and fsync, an Append and an ack per follower, each follower's log write and fsync,
the staging and the COMMIT of the group, and a hand-off between threads or processes for each (measured
with ``bench/replication_profile.py`` on 3 nodes and 2 cores: about 1.3 ms of the leader's CPU and 0.55 ms
of each follower's per round, against about 0.1 and 0.04 ms per write). Under concurrent load the rounds
carry what arrived while the previous one was on its way, 9-11 writes at 32 clients, so most of the
cluster's CPU went to rounds rather than to writes.

So a leader holds a submitted write back for at most ``delay_s`` while enough other writes are under way
(submitted and not yet answered) that more will soon join it, and lets the held writes into the log
together. A write with fewer than ``siblings`` others under way enters at once: a lone client, or a few,
never wait. A held group that reaches ``enough`` writes goes at once. This is PostgreSQL's ``commit_delay``
with ``commit_siblings``, applied to the replicated log. The shell (the Replicator) keeps the held writes;
they are not in the log, so what is committed, and every safety rule, is untouched: only when a write
enters the log changes.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Gather:
    """The gathering rule's settings. ``delay_s`` 0 turns gathering off."""

    delay_s: float = 0.003  # the longest a held write waits for others (WRITE_GATHER)
    siblings: int = 4  # held only while at least this many other writes are under way
    enough: int = 24  # a held group this large enters the log at once

    def __post_init__(self) -> None:
        if not self.delay_s >= 0 or self.siblings < 1 or self.enough < 1:
            raise ValueError(f"a delay >= 0 s and counts >= 1, not {self!r}")


def release_at(rule: Gather, held: int, under_way: int, first_held_s: float) -> float:
    """When the ``held`` writes (the first of them held since ``first_held_s``) enter the log: at
    ``first_held_s`` (that is, at once) or at most ``rule.delay_s`` later. ``under_way`` counts every write
    submitted and not yet answered, the held ones included."""
    if rule.delay_s <= 0 or held >= rule.enough or under_way - held < rule.siblings:
        return first_held_s
    return first_held_s + rule.delay_s
