"""The node's persistent identity: a random UUID created once and kept in DATA_DIR.

Why: node IDs for leadership come from IP addresses, and a re-created container may come back with another
IP. Votes, promises and log entries must stay tied to *this* replica, not to an address, or a node could
vote twice in one epoch under two names, or a log could be mistaken for another node's. The identity lives
in its own file (``DATA_DIR/node-identity``), apart from the log and the hard state. With replication a
damaged database or log is quarantined together with this file (:mod:`node.actors.replicator`): the node
comes back under a new identity, a new member that never made the promises the old one made.

Blocking file I/O: call from a worker thread (or at start before the event loop serves anything).
"""

from __future__ import annotations

import uuid
from pathlib import Path

import orjson

from node.storage.durable import FramedFileError, decode_framed, encode_framed, write_atomic

IDENTITY_FILE_NAME = "node-identity"
IDENTITY_MAGIC = b"TNIDENT\x00"
IDENTITY_VERSION = 1
_READABLE_VERSIONS = frozenset({IDENTITY_VERSION})


class IdentityError(RuntimeError):
    """The identity file exists but cannot be trusted. The node must not invent a new identity over it while
    its log and hard state stay (it could vote again in epochs it already voted in): with replication the
    whole replicated state is quarantined with it and the node rejoins as a new member."""


def read_identity(data_dir: Path) -> str | None:
    """This node's identity, or None if it has none yet (raises IdentityError for a damaged file)."""
    path = data_dir / IDENTITY_FILE_NAME
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    return _decode(path, data)


def load_or_create_identity(data_dir: Path) -> str:
    """Return this node's identity (a UUID string), creating and persisting it on the first start."""
    path = data_dir / IDENTITY_FILE_NAME
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        identity = str(uuid.uuid4())
        data_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(
            path, encode_framed(IDENTITY_MAGIC, IDENTITY_VERSION, orjson.dumps({"node_id": identity}))
        )
        return identity
    return _decode(path, data)


def _decode(path: Path, data: bytes) -> str:
    try:
        _, body = decode_framed(data, IDENTITY_MAGIC, _READABLE_VERSIONS)
        identity = orjson.loads(body)["node_id"]
        return str(uuid.UUID(identity))
    except (FramedFileError, orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise IdentityError(
            f"{path} is unreadable ({exc}); move it away only if this node's log and hard state go too"
        ) from exc
