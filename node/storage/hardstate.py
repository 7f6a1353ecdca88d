"""The replica's hard state: what it promised and where it stands, persisted atomically before it is used.

Why: a voter that forgets a promise after a restart could promise the same epoch to two candidates, and a
leader that forgets its epoch could reuse one; both break "at most one leader commits per epoch". So:

* **Persist before send.** The shell saves a new hard state (and ``save`` returns only when it is durable)
  before it sends any message of that epoch or any vote/promise that depends on it.
* **Atomic replace.** temp file -> fsync -> rename -> fsync directory (:func:`node.storage.durable.write_atomic`):
  a crash leaves the old or the new state, never a mix. Versioned and checksummed, so a damaged or foreign file
  is reported (:class:`HardStateError`) instead of being read as epoch 0.

Fields (all durable; none is derived from the clock):

* ``epoch``: the highest epoch this replica has joined (accepted a leader's start-of-epoch for, or started).
* ``promised_epoch`` / ``promised_to``: the highest epoch it promised, and to which node identity; never
  lower than ``epoch``. A voter never promises an epoch <= ``promised_epoch`` to anyone else.
* ``commit_index``: the highest index known committed when last saved (a hint for restart; the log itself is
  authoritative for entries, and saving this is not required for safety).
* ``voters``: the voter configuration (persistent identities) in force when saved; the log's membership
  entries are authoritative, this lets a restarted node know its quorum before replaying them.
* ``node_id``: the identity of the replica that wrote it, so a state file copied onto another node is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import orjson

from node.storage.durable import FramedFileError, decode_framed, encode_framed, write_atomic

HARD_STATE_FILE_NAME = "hard-state"
HARD_STATE_MAGIC = b"TNHARDST"
HARD_STATE_VERSION = 1
_READABLE_VERSIONS = frozenset({HARD_STATE_VERSION})


class HardStateError(RuntimeError):
    """The hard state file exists but is damaged, foreign or of an unknown version: never read as empty."""


@dataclass(frozen=True, slots=True)
class HardState:
    node_id: str
    epoch: int = 0
    promised_epoch: int = 0
    promised_to: str | None = None
    commit_index: int = 0
    voters: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("epoch", "promised_epoch", "commit_index"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << 63:
                raise ValueError(f"{name} must be an integer in [0, 2**63), not {value!r}")
        if self.promised_epoch < self.epoch:
            raise ValueError(f"promised_epoch {self.promised_epoch} is below epoch {self.epoch}")
        if not self.node_id:
            raise ValueError("node_id is required")


def encode_hard_state(state: HardState) -> bytes:
    body = orjson.dumps(
        {
            "node_id": state.node_id,
            "epoch": state.epoch,
            "promised_epoch": state.promised_epoch,
            "promised_to": state.promised_to,
            "commit_index": state.commit_index,
            "voters": list(state.voters),
        }
    )
    return encode_framed(HARD_STATE_MAGIC, HARD_STATE_VERSION, body)


def decode_hard_state(data: bytes) -> HardState:
    _, body = decode_framed(data, HARD_STATE_MAGIC, _READABLE_VERSIONS)
    fields = orjson.loads(body)
    if not isinstance(fields, dict):
        raise ValueError("hard state body is not an object")
    voters = fields.get("voters", [])
    if not isinstance(voters, list) or not all(isinstance(v, str) for v in voters):
        raise ValueError("voters must be a list of identities")
    promised_to = fields.get("promised_to")
    if promised_to is not None and not isinstance(promised_to, str):
        raise ValueError("promised_to must be an identity or null")
    return HardState(
        node_id=str(fields["node_id"]),
        epoch=fields.get("epoch", 0),
        promised_epoch=fields.get("promised_epoch", 0),
        promised_to=promised_to,
        commit_index=fields.get("commit_index", 0),
        voters=tuple(voters),
    )


def load_hard_state(directory: Path, node_id: str) -> HardState:
    """The saved hard state, or a fresh one (epoch 0) if none was ever saved. Blocking: a worker thread."""
    path = directory / HARD_STATE_FILE_NAME
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return HardState(node_id=node_id)
    try:
        state = decode_hard_state(data)
    except (FramedFileError, orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise HardStateError(f"{path} is unreadable: {exc}") from exc
    if state.node_id != node_id:
        raise HardStateError(f"{path} belongs to node {state.node_id}, not to this node ({node_id})")
    return state


def save_hard_state(directory: Path, state: HardState) -> None:
    """Durably replace the hard state; returns only when a crash can no longer lose it. Blocking."""
    write_atomic(directory / HARD_STATE_FILE_NAME, encode_hard_state(state))
