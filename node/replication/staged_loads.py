"""Staged SQLite files of replicated ``/db/load``: kept on a majority BEFORE the load is proposed.

Why stage first: an SQLite file may be far larger than a log entry may be, so the log carries only a
:class:`~node.storage.statemachine.LoadFile` command naming the file by SHA-256. Applying that entry must
never wait for bytes that exist nowhere: the leader proposes it only once a majority of voters (itself
included) hold the file durably, so whatever majority later commits and applies the entry includes a
node that can hand the file to the others.

Protocol
--------
* ``POST /cluster/replication/stage`` (peer-signed over its body, replay-guarded in its own window), body
  ``{"sha256": hex, "size": bytes}``: the receiver pulls ``load-<sha256>`` from the sender (the leader)
  over the snapshot route (``GET /cluster/replication/snapshot/load-<sha256>``: same signature, rate
  limit and send slots as snapshots, resumable), verifies size and SHA-256, fsyncs the file and its
  directory, and answers 200 ``{"staged": true}`` only then. 507 when its disk cannot hold the file.
* The leader counts itself and every voter that answered 200 (:func:`staged_majority`).
* Applying the ``LoadFile`` entry at index L, on every node in log order: a copy of the staged file is
  stamped with L (and the load's request ID) and swapped in; a node that lacks the file (it was down while
  staging) first fetches it by SHA-256 from the leader or any member that has it.

Layout: ``DATA_DIR/snapshots/loads/<sha256>.db`` (complete, verified, durable), ``incoming/<sha256>.part``
(a download in progress, resumed by the next attempt). The snapshot store ignores this directory (its
name is not a snapshot stem).

Disk budget: at most ``KEEP_STAGED_LOADS`` files (each at most ``DB_MAX_LOAD_BYTES``) plus the parts of
downloads running (a part idle for ``STALE_PART_S`` is removed when another download starts); a
file is removed once the log no longer holds its entry (every node that could still need it from this
node's log has it applied, or is sent a snapshot, which holds the loaded data; the core's in-memory window
of applied entries counts as log too), and the oldest goes first
when a new one would exceed the count.

Every method that touches the disk blocks: callers run it with ``asyncio.to_thread``. :meth:`has`,
:meth:`size_of` and :meth:`removable` read memory only (the HTTP route resolves names on the loop).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from node import errors
from node.core import peerauth
from node.replication import snapshot_transfer as transfer
from node.storage.durable import FILE_CHUNK_BYTES, fsync_dir
from node.storage.snapshots import SnapshotMeta, digest_file, snapshot_dir

LOADS_DIR_NAME = "loads"
INCOMING_DIR_NAME = "incoming"
KEEP_STAGED_LOADS = 3  # the newest few: a load being staged, one being applied, one a lagging node may fetch
NAME_PREFIX = "load-"
STAGE_PATH = "/cluster/replication/stage"
DB_SUFFIX = ".db"
PART_SUFFIX = ".part"
_TEMP_PREFIX = ".tmp-"
_HEX = frozenset("0123456789abcdef")
MAX_STAGE_BODY_BYTES = 1024
# A part nothing wrote for this long belongs to no running download (a running one writes at least every
# snapshot_transfer.STALL_TIMEOUT_S, or is interrupted): removed when another download starts.
STALE_PART_S = 4 * transfer.STALL_TIMEOUT_S


class StagedFileMissing(errors.NodeError):
    """A LoadFile entry is due and no reachable member holds its file yet: the apply is retried."""

    status = 503
    code = "load_file_missing"


def valid_sha256(text: Any) -> bool:
    return isinstance(text, str) and len(text) == 64 and set(text) <= _HEX


def load_name(sha256: str) -> str:
    """The name a staged file is served under on the snapshot route."""
    return NAME_PREFIX + sha256


def parse_load_name(text: str) -> str | None:
    """The SHA-256 a name made by :func:`load_name` stands for; None for anything else."""
    if not isinstance(text, str) or not text.startswith(NAME_PREFIX):
        return None
    sha256 = text[len(NAME_PREFIX) :]
    return sha256 if valid_sha256(sha256) else None


def load_meta(sha256: str, size_bytes: int) -> SnapshotMeta:
    """The transfer meta of a staged file: the snapshot route's headers and checks need a SnapshotMeta;
    only size and digest mean something here (no epoch or index: the file is not in the log yet)."""
    return SnapshotMeta(
        cluster="", epoch=0, index=1, config=b"", sha256=sha256, size_bytes=size_bytes, sqlite_version=""
    )


def majority_of(voters: int) -> int:
    return voters // 2 + 1


def staged_majority(voters: Iterable[str], staged: Iterable[str]) -> bool:
    """Whether the nodes that hold the file durably (``staged``: identities, the leader's own included)
    are a majority of ``voters``. Learners and strangers in ``staged`` count for nothing."""
    voter_set = frozenset(voters)
    return bool(voter_set) and len(voter_set & frozenset(staged)) >= majority_of(len(voter_set))


def encode_stage_request(sha256: str, size_bytes: int) -> bytes:
    return orjson.dumps({"sha256": sha256, "size": size_bytes})


def decode_stage_request(data: bytes) -> tuple[str, int]:
    """(sha256, size) of a stage request; ValueError for anything else."""
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(body, dict) or set(body) != {"sha256", "size"}:
        raise ValueError("a stage request is exactly {sha256, size}")
    sha256, size = body["sha256"], body["size"]
    if not valid_sha256(sha256):
        raise ValueError("sha256 must be 64 lowercase hex digits")
    if type(size) is not int or not 0 < size < (1 << 62):
        raise ValueError("size must be a positive integer")
    return sha256, size


@dataclass(frozen=True, slots=True)
class StagedFile:
    sha256: str
    size_bytes: int


class StagedLoads:
    """The staged-load directory of one node (module doc)."""

    def __init__(self, data_dir: Path, keep: int = KEEP_STAGED_LOADS) -> None:
        self.directory = snapshot_dir(data_dir) / LOADS_DIR_NAME
        self.incoming = self.directory / INCOMING_DIR_NAME
        self.keep = keep
        self._lock = threading.Lock()
        self._files: dict[str, int] = {}  # sha256 -> size, oldest first
        self._applied: dict[str, int] = {}  # sha256 -> the index that applied it (this process's memory)
        self._seq = itertools.count(1)

    # --- memory only ----------------------------------------------------------------------------------------

    def has(self, sha256: str, size_bytes: int | None = None) -> bool:
        with self._lock:
            size = self._files.get(sha256)
        return size is not None and (size_bytes is None or size == size_bytes)

    def size_of(self, sha256: str) -> int | None:
        with self._lock:
            return self._files.get(sha256)

    def files(self) -> list[StagedFile]:
        with self._lock:
            return [StagedFile(s, n) for s, n in self._files.items()]

    def path_of(self, sha256: str) -> Path:
        return self.directory / (sha256 + DB_SUFFIX)

    def part_of(self, sha256: str) -> Path:
        return self.incoming / (sha256 + PART_SUFFIX)

    def temp_path(self) -> Path:
        return self.directory / f"{_TEMP_PREFIX}{os.getpid()}-{next(self._seq)}"

    def mark_applied(self, sha256: str, index: int) -> None:
        with self._lock:
            self._applied[sha256] = index

    def removable(self, log_first_index: int, memory_base: int) -> list[str]:
        """Files applied at an index this node can no longer send as an entry: below its durable log's
        first entry AND at or below ``memory_base`` (the newest applied entry the replication core no longer
        keeps in memory). A member that far behind is sent a snapshot, which holds the loaded data; one
        that is not can still be sent the entry, and may need the file from this node."""
        with self._lock:
            gone = min(log_first_index - 1, memory_base)  # the newest index this node cannot send
            return [s for s, at in self._applied.items() if at <= gone and s in self._files]

    # --- blocking -------------------------------------------------------------------------------------------

    def open(self) -> list[StagedFile]:
        """Create the directories, drop temp files, wrongly named files and parts of files already held,
        index the staged files (oldest first, by modification time) and prune to ``keep``."""
        self.incoming.mkdir(parents=True, exist_ok=True)
        found: list[tuple[float, str, int]] = []
        with self._lock:
            for path in self.directory.iterdir():
                if path.is_dir():
                    continue
                name = path.name
                sha256 = name[: -len(DB_SUFFIX)] if name.endswith(DB_SUFFIX) else ""
                if not valid_sha256(sha256):
                    path.unlink(missing_ok=True)
                    continue
                st = path.stat()
                found.append((st.st_mtime, sha256, st.st_size))
            found.sort()
            self._files = {sha256: size for _, sha256, size in found}
            for path in self.incoming.iterdir():
                sha256 = path.name[: -len(PART_SUFFIX)] if path.name.endswith(PART_SUFFIX) else ""
                if not valid_sha256(sha256) or sha256 in self._files:
                    path.unlink(missing_ok=True)
            self._prune(None)
            fsync_dir(self.incoming)
            fsync_dir(self.directory)
            return [StagedFile(s, n) for s, n in self._files.items()]

    def stage_local(self, source: Path) -> StagedFile:
        """Make ``source`` (a file on the same filesystem: the upload in DATA_DIR) a staged file; it is
        moved, not copied. Hashed and fsynced through one descriptor, renamed, directory fsynced: durable
        when it returns."""
        digest = digest_file(source)
        self._install(source, digest.sha256, digest.size_bytes)
        return StagedFile(digest.sha256, digest.size_bytes)

    def finish_part(self, sha256: str, size_bytes: int) -> None:
        """Verify a complete download (size and SHA-256) and stage it; a mismatch deletes the part and
        raises ValueError (the next attempt starts over)."""
        part = self.part_of(sha256)
        digest = digest_file(part)
        if (digest.sha256, digest.size_bytes) != (sha256, size_bytes):
            part.unlink(missing_ok=True)
            raise ValueError(
                f"received load file is {digest.size_bytes} bytes with sha256 {digest.sha256[:12]}..., "
                f"expected {size_bytes} bytes with {sha256[:12]}...: discarded"
            )
        self._install(part, sha256, size_bytes)

    def copy_to(self, sha256: str, target: Path) -> None:
        """Copy a staged file to ``target`` (fsynced): a load consumes its file, the staged one stays."""
        with open(self.path_of(sha256), "rb") as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, FILE_CHUNK_BYTES)
            dst.flush()
            os.fsync(dst.fileno())

    def drop_stale_parts(self, keep: str, now_s: float | None = None) -> list[str]:
        """Remove parts of other files that nothing has written for ``STALE_PART_S`` (an abandoned
        staging: its load was never proposed, or the file was fetched elsewhere), so parts stay bounded
        by the downloads actually running. Returns the digests removed."""
        now_s = time.time() if now_s is None else now_s
        removed = []
        for path in self.incoming.iterdir():
            sha256 = path.name[: -len(PART_SUFFIX)] if path.name.endswith(PART_SUFFIX) else ""
            if sha256 == keep:
                continue
            try:
                idle_s = now_s - path.stat().st_mtime
            except FileNotFoundError:
                continue
            if idle_s >= STALE_PART_S:
                path.unlink(missing_ok=True)
                removed.append(sha256)
        return removed

    def remove(self, sha256: str) -> None:
        with self._lock:
            self._remove(sha256)
            fsync_dir(self.directory)

    def _install(self, source: Path, sha256: str, size_bytes: int) -> None:
        with self._lock:
            if sha256 in self._files:
                source.unlink(missing_ok=True)
                self._files[sha256] = self._files.pop(sha256)  # now the newest: pruned last
                return
            os.replace(source, self.path_of(sha256))
            fsync_dir(self.directory)
            self._files[sha256] = size_bytes
            self._prune(sha256)
            fsync_dir(self.directory)

    def _prune(self, keep: str | None) -> None:
        # Each round removes one file: bounded by their number.
        while len(self._files) > self.keep:
            victim = next(s for s in self._files if s != keep)
            self._remove(victim)

    def _remove(self, sha256: str) -> None:
        self.path_of(sha256).unlink(missing_ok=True)
        self.part_of(sha256).unlink(missing_ok=True)
        self._files.pop(sha256, None)
        self._applied.pop(sha256, None)


# --- transfers ----------------------------------------------------------------------------------------------


async def fetch(
    store: StagedLoads,
    sha256: str,
    size_bytes: int,
    base_urls: Sequence[str],
    *,
    sign_headers: transfer.SignHeaders,
    log: Any,
    rate: transfer.RateLimiter | None = None,
) -> str:
    """Pull the staged file from the first of ``base_urls`` that serves it (resuming a part); returns the
    URL that did. Raises :class:`StagedFileMissing` naming every failure when none did."""
    if store.has(sha256, size_bytes):
        return "local"
    meta = load_meta(sha256, size_bytes)
    await asyncio.to_thread(store.drop_stale_parts, sha256)
    failures: list[str] = []
    connector = aiohttp.TCPConnector(limit=2)
    async with aiohttp.ClientSession(connector=connector) as session:
        for base in base_urls:
            url = transfer.snapshot_url(base, load_name(sha256))
            try:
                await transfer.download(
                    session, url, meta, store.part_of(sha256), sign_headers=sign_headers, log=log, rate=rate
                )
                await asyncio.to_thread(store.finish_part, sha256, size_bytes)
                return base
            except (transfer.TransferError, ValueError) as exc:
                failures.append(f"{base}: {exc}"[:200])
    why = "; ".join(failures) or "no member known"
    raise StagedFileMissing(f"load file {sha256[:12]}... is not staged here and no member served it: {why}")


async def ask_to_stage(
    session: aiohttp.ClientSession,
    base_url: str,
    sha256: str,
    size_bytes: int,
    *,
    signer: peerauth.Signer,
    timeout_s: float,
) -> None:
    """Ask the peer at ``base_url`` to stage the file (it pulls it from this node); returns once it holds
    it durably, raises :class:`transfer.TransferError` otherwise (refused, unreachable, out of time)."""
    body = encode_stage_request(sha256, size_bytes)
    headers = {
        peerauth.HEADER: signer.next_header(STAGE_PATH, 0, body),
        transfer.SENDER_HEADER: signer.sender,
        "Content-Type": "application/json",
    }
    timeout = aiohttp.ClientTimeout(total=timeout_s, connect=transfer.CONNECT_TIMEOUT_S)
    try:
        async with session.post(
            f"{base_url.rstrip('/')}{STAGE_PATH}", data=body, headers=headers, timeout=timeout,
            allow_redirects=False,
        ) as resp:  # fmt: skip
            answer = await resp.content.read(transfer.MAX_ERROR_BODY_BYTES)
            if resp.status != 200:
                raise transfer.TransferRefused(
                    f"{base_url}: HTTP {resp.status}: {answer[:200].decode('utf-8', 'replace')}",
                    resp.status,
                    None,
                )
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise transfer.TransferInterrupted(f"{base_url}: {type(exc).__name__}: {exc}"[:300]) from exc
