"""The replication core's hard state on disk (``replication-state`` in DATA_DIR).

The core's HardState holds the configuration history (voters AND learners, with their log indices), which
:mod:`node.storage.hardstate`'s record has no room for; it gets its own framed, versioned, atomically
replaced file. The file names the identity of the node that wrote it, so a file copied from another node's
DATA_DIR is refused rather than read as this node's promises. Used by the Replicator (saved on its durable
log's thread, read at start) and by ``python -m node recover``.
"""

from __future__ import annotations

from pathlib import Path

import orjson

from node.core.replication import messages as msg
from node.errors import RefusedToRun
from node.storage.durable import FramedFileError, decode_framed, encode_framed, write_atomic

REPLICATION_STATE_FILE = "replication-state"
_STATE_MAGIC = b"TNREPST\x00"
_STATE_VERSION = 1


class HardStateDamaged(RuntimeError):
    """The core hard-state file exists but cannot be read: what this node promised is lost."""


def encode_core_hard_state(hard: msg.HardState, identity: str) -> bytes:
    body = {
        "identity": identity,
        "epoch": hard.epoch,
        "promised_to": hard.promised_to,
        "configs": [[i, c.encode().decode()] for i, c in hard.configs],
        "cluster": hard.cluster,
    }
    return encode_framed(_STATE_MAGIC, _STATE_VERSION, orjson.dumps(body))


def decode_core_hard_state(data: bytes) -> tuple[str, msg.HardState]:
    """(identity of the node that wrote it, hard state)."""
    _, raw = decode_framed(data, _STATE_MAGIC, frozenset({_STATE_VERSION}))
    body = orjson.loads(raw)
    configs = tuple((int(i), msg.Config.decode(c.encode())) for i, c in body["configs"])
    cluster = body.get("cluster", "")  # absent in files written before clusters were named
    if not isinstance(cluster, str):
        raise ValueError("cluster must be a string")
    return str(body["identity"]), msg.HardState(int(body["epoch"]), body["promised_to"], configs, cluster)


def save_core_hard_state(directory: Path, hard: msg.HardState, identity: str) -> None:
    """Blocking: durable when it returns (temp file, fsync, rename, fsync the directory)."""
    write_atomic(directory / REPLICATION_STATE_FILE, encode_core_hard_state(hard, identity))


def load_core_hard_state(directory: Path, identity: str) -> msg.HardState | None:
    """Blocking. None if never saved; a damaged file, or one another node wrote (a copied DATA_DIR file),
    raises: never read as 'no promise made'."""
    path = directory / REPLICATION_STATE_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        owner, hard = decode_core_hard_state(data)
    except (FramedFileError, orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise HardStateDamaged(f"{path} is unreadable: {exc}") from exc
    if owner != identity:
        raise RefusedToRun(f"{path} belongs to node {owner}, not to this node ({identity})")
    return hard
