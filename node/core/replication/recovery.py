"""Recovery after the permanent loss of a majority: what one chosen survivor writes to lead a new cluster. Pure.

Why: with a majority of voters gone for good, no candidate can ever collect a majority of promises, so the
cluster stays read-only for ever. The only way out keeps what one survivor holds and gives up on the rest:
the survivor becomes the sole voter of a *new* cluster. That is unsafe by nature -- writes the lost majority
acknowledged but this survivor never received are lost -- so it is an explicit operator command
(``python -m node recover``, the shell in ``node.recover``), never something a node decides by itself.

What recovery writes (the shell carries it out; this module only computes it from what is on disk):

* **A CONFIG entry** ``Config(voters={me})`` at ``last index + 1`` in a new epoch ``E = max(hard state epoch,
  last log epoch) + 1``: epochs in a log never decrease, and no entry of the old cluster has epoch E.
* **A hard state** with epoch E promised to this node (so it never promises E to anyone else), the old
  configuration history up to the last index followed by that entry, and a **fresh cluster name**
  (``RECOVERED_PREFIX`` + random hex drawn by the shell). The core drops every message of another cluster
  (``machine._Step.same_cluster``), so a node still holding the old cluster's history, with the same
  epochs and indices meaning other entries, can never mix its log with the new one: it must start with an
  empty DATA_DIR and join as a learner.

What ``restore`` then makes of it at the next start: configurations at or below the applied index come
from the hard state, every CONFIG entry above it from the log, so the new entry makes this node the only
voter. Entries above the applied index are uncommitted until a leader commits them; as the only voter
this node campaigns, wins (its own promise is a majority of one), appends its EPOCH_START and commits it,
which commits every entry before it: **everything in this log becomes committed**, including entries the
old cluster may never have committed (those were possibly never acknowledged to a client; they are kept).

Order on disk (the shell's, see ``node.recover``): the hard state first (atomic replace, fsynced), then the
log entry (append, fsync). Killed in between, the node holds the new cluster name with its old
configuration: it cannot reach a quorum of voters that are gone, and no old node speaks its cluster, so it
stays stuck and harmless; :func:`plan` recognises that state (``FINISH``) and a re-run appends the entry.
The other order would leave, in between, a log that makes this node sole voter *of the old cluster*: it
could lead the old cluster's survivors and overwrite entries they committed. A re-run after a complete
recovery, before the node ever ran, finds ``DONE`` and changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum

from node.core.replication.messages import Config, Entry, HardState, Kind, LogId

# Cluster names that recovery drew start with this (normal ones are 32 hex digits or "log1-..."), so a
# half-done or complete recovery is recognised from the disk alone. Within codec.MAX_IDENTITY_CHARS (64).
RECOVERED_PREFIX = "recovered-"
NO_HARD_STATE = (
    "this DATA_DIR has no replication state: it was written with REPLICATION=off, or the node never joined a "
    "cluster; there is no replicated cluster to recover"
)


class Action(Enum):
    RECOVER = "recover"  # write the hard state, then append the entry
    FINISH = "finish"  # the hard state is written, the entry is missing (interrupted run): append it
    DONE = "done"  # both are on disk and the node has not run since: nothing to do


class Refused(ValueError):
    """The data directory holds nothing recovery can start from; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class Plan:
    action: Action
    me: str
    old: HardState  # as found on disk
    last: LogId  # the log's last entry as found on disk
    hard: HardState  # the hard state after recovery (written by RECOVER; already on disk otherwise)
    entry: Entry  # the CONFIG entry that makes ``me`` the only voter (appended by RECOVER and FINISH)

    @property
    def epoch(self) -> int:
        return self.hard.epoch

    @property
    def cluster(self) -> str:
        return self.hard.cluster

    @property
    def old_voters(self) -> frozenset[str]:
        """The voters of the old cluster as of the last configuration this node knows."""
        return self.old.config.voters


def sole_voter(me: str) -> Config:
    return Config(voters=frozenset({me}))


def plan(me: str, hard: HardState | None, last: LogId, last_entry: Entry | None, new_cluster: str) -> Plan:
    """What recovery must do, from what the node holds: its hard state (None if it never saved one), its
    log's last LogId and the entry there (None if the log holds no entry: empty, or compacted up to a
    snapshot, where ``last`` is the entry the log starts after). ``new_cluster``: a fresh random name
    with ``RECOVERED_PREFIX`` (used only by RECOVER). Raises :class:`Refused` if there is nothing to
    recover from."""
    if not new_cluster.startswith(RECOVERED_PREFIX) or len(new_cluster) <= len(RECOVERED_PREFIX):
        raise ValueError(f"a recovered cluster's name starts with {RECOVERED_PREFIX!r}")
    if hard is None:
        raise Refused(NO_HARD_STATE)
    if last.index == 0:
        raise Refused(
            "this node's log is empty: it holds nothing to keep; recover from the survivor with the most "
            "advanced log (highest last epoch, then highest last index)"
        )
    if last_entry is not None and last_entry.id != last:
        raise ValueError(f"last_entry {last_entry.id} is not the log's last entry {last}")
    mine = sole_voter(me)
    recovered = hard.cluster.startswith(RECOVERED_PREFIX) and hard.promised_to == me
    if recovered and hard.configs[-1] == (last.index + 1, mine) and hard.epoch > last.epoch:
        return Plan(Action.FINISH, me, hard, last, hard, _entry(hard.epoch, last.index + 1, mine))
    if (
        recovered
        and hard.configs[-1] == (last.index, mine)
        and last_entry == _entry(hard.epoch, last.index, mine)
    ):
        return Plan(Action.DONE, me, hard, last, hard, last_entry)
    epoch = max(hard.epoch, last.epoch) + 1
    entry = _entry(epoch, last.index + 1, mine)
    # Configurations above the last index belong to entries that never reached this log (a crash between a
    # hard-state write and its append): restore would drop them; they must not precede the new entry.
    kept = tuple(c for c in hard.configs if c[0] <= last.index)
    new = replace(
        hard, epoch=epoch, promised_to=me, configs=(*kept, (entry.index, mine)), cluster=new_cluster
    )
    return Plan(Action.RECOVER, me, hard, last, new, entry)


def _entry(epoch: int, index: int, config: Config) -> Entry:
    return Entry(epoch, index, Kind.CONFIG, config.encode())
