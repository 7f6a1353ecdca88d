"""ReplicatedDataService: the DataService (``node.service``) of a node with REPLICATION=on.

* ``submit``: stamps the write once, here, off the event loop (followers never re-stamp: the stamped
  command is the log entry), hands it to the Replicator as leader and answers when it is applied, with the
  real per-statement results, the epoch and the index. A follower never gets here for a client's write:
  the forwarding middleware (``node.http.replication``) sends it to the leader first; if it does (a leader
  change in between, or no healthy leader), the core's rejection is the answer (503 not_leader / no_quorum
  / not_writable with the core's reason).
* ``read``: ``none`` reads the local copy (with ``freshness``, only if this node heard from the leader
  within that time, and with ``freshness_strict`` has also applied what that leader had committed; else
  503 ``stale_read``, see :func:`staleness`); ``weak`` / ``auto`` read the leader's local state (followers
  forward, see the middleware); ``linearizable`` / ``strong`` first have a majority confirm that this node
  still leads (ReadIndex), wait until that index is applied, then read locally.
* ``load_dump_file`` (/db/load of an SQL dump) is a replicated operation. The leader splits the dump (a
  file the HTTP layer streamed to DATA_DIR) into whole statements, stamps them once (time keywords) and
  packs them into chunk commands of at most ``LOAD_CHUNK_BYTES`` (one statement larger than that goes
  alone, up to ``MAX_LOAD_STATEMENT_BYTES``), each an ordinary log entry, at most ``LOAD_WINDOW`` in flight:
  so heartbeats and other writes interleave with them and never wait behind one huge entry. Reading,
  splitting, hashing and encoding run in a thread, one chunk at a time (never the whole dump in memory).
  Chunks apply as staging only; then one end command runs every chunk in ONE SQLite transaction, on every
  replica at the same index, checked against the count and digest the leader shipped: all or nothing, and
  concurrent writes land before or after it, never inside (:mod:`node.storage.statemachine`). A load whose
  end is never submitted (a chunk was not committed: leader change, lost quorum) is not applied: 503
  ``load_not_applied``; its staged chunks are dropped by an abort entry or by the next load. When the end
  itself has an unknown outcome the answer is 503 ``outcome_unknown``: retry with the same X-Request-Id,
  which holds for loads as for writes (the end command carries it; the dump's digest is what it stands
  for). One load at a time per leader (another answers 503 busy).
* ``load_sqlite_file`` (/db/load of an SQLite file) replaces the cluster's database as ONE replicated
  operation through the snapshot path (:mod:`node.replication.staged_loads`). The leader checks the file
  (``PRAGMA quick_check`` on its own copy of the upload, in a thread: 400 if bad, nothing changed; a
  WAL-mode file is switched to a rollback journal, so it is one self-contained file), keeps it as a staged load
  file (durable), and asks every other member to pull and keep it too; only once a majority of voters
  (itself included) hold it durably does it propose one ``LoadFile`` entry naming the file by SHA-256. If
  no majority holds it within the staging time: 503 ``load_not_staged`` and nothing is proposed. Every
  node applies the entry in log order, alone, by swapping in a copy of the file stamped with the entry's
  index (a node that missed the staging fetches the file first); the client is answered when the leader
  applied it. Retries with the same X-Request-Id apply at most once (the request ID is recorded in the
  loaded database at the same index on every node).

The epoch of each answered write is published in a context variable so the HTTP layer can name it in a
header (``X-TalentNest-Epoch``) without changing the DataService protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import aiohttp

from node import errors
from node.actors.replicator import Discarded, NotWritable, OutcomeUnknown, Replicator
from node.core.replication import machine
from node.core.sqlreq import DbRequest, Flags, Level, WriteCommand, rewrite_time_keywords, stamp_write
from node.replication import codec, staged_loads
from node.replication.staged_loads import staged_majority
from node.service import LoadOutcome, WriteOutcome, WriteRequest
from node.storage import statemachine
from node.storage.dump import (
    LOAD_CHUNK_BYTES,
    LOAD_ENVELOPE_BYTES,
    MAX_LOAD_STATEMENT_BYTES,
    chunk_statements,
    dump_statements,
)
from node.storage.durable import free_bytes
from node.storage.results import StatementResult, Status
from node.storage.sqlite import Database, check_sqlite_file
from node.storage.statemachine import Command, LoadChunk, LoadDigest, LoadEnd, LoadFile

# Seconds a write waits for commit and apply before it answers "outcome unknown" (503). Far above a
# healthy commit (milliseconds); a node that loses its quorum answers sooner (see the Replicator).
WRITE_WAIT_S = 10.0
READ_CONFIRM_S = 5.0
# How long one look at DATA_DIR's free space (for LOG_RESERVE_BYTES) is trusted before the next, off the loop.
SPACE_CHECK_S = 0.5

# Chunk entries of a load in flight at once (submitted, not yet applied): keeps the pipe full without
# letting one load hold the Replicator's queue.
LOAD_WINDOW = 4
# A chunk whose submit failed transiently (outcome unknown, no quorum for a moment) is submitted again, at
# most this many times in all, after a pause doubling from the first (chunks are idempotent; ends are not).
LOAD_CHUNK_ATTEMPTS = 5
LOAD_CHUNK_RETRY_FIRST_S = 0.1
# How long a load's end waits for commit and apply: a base, plus a second per MiB of dump (applying runs
# every statement of the dump on every replica).
LOAD_END_WAIT_S = 30.0
LOAD_END_WAIT_S_PER_MIB = 1.0
# A load needs about this many times the dump's size free in DATA_DIR beyond LOG_RESERVE_BYTES: the log's
# chunk entries, the staged chunks and the loaded data (checked before anything is shipped, and per chunk).
LOAD_SPACE_FACTOR = 3
# After a majority of voters staged a file load, the others get at most this long more before the load is
# proposed without them (they fetch the file when they apply the load).
STAGE_GRACE_S = 2.0

# Writes whose SQL and parameters total at most this many characters (about) are stamped and encoded on the
# event loop: tens of microseconds, against two thread switches that cost milliseconds on a busy machine.
INLINE_PREPARE_BYTES = 4096
_INLINE_MAX_PARAMS = 64


def _inline_size(request: WriteRequest) -> int:
    """An upper-bound estimate of the characters a write's preparation walks; a huge sentinel when it has
    many or large parameters (blobs, long texts), so those are prepared off the loop."""
    total = 0
    for statement in request.statements:
        total += len(statement.sql)
        params = statement.params
        if params is None:
            continue
        values = (
            params
            if type(params) is tuple
            else list(params.values())
            if isinstance(params, Mapping)
            else params
        )
        if len(values) > _INLINE_MAX_PARAMS:
            return INLINE_PREPARE_BYTES + 1
        for value in values:
            total += len(value) if isinstance(value, str | bytes) else 16
        if total > INLINE_PREPARE_BYTES:
            break
    return total


# Seeds read from the system's random source at once, and handed out one per write: one read per
# SEED_BATCH writes instead of one each (a system call of a few microseconds). A seed is no secret (it
# travels in the log entry); it must only be unpredictable to a client, which os.urandom is.
SEED_BATCH = 64


class UrandomSeeds:
    """63-bit seeds from ``os.urandom``, read :data:`SEED_BATCH` at a time (a bounded list, refilled when
    empty)."""

    def __init__(self) -> None:
        self._left: list[int] = []

    def __call__(self) -> int:
        left = self._left
        if not left:
            data = os.urandom(8 * SEED_BATCH)
            left.extend(int.from_bytes(data[i : i + 8], "big") >> 1 for i in range(0, len(data), 8))
        return left.pop()


# Flags of a write's command: only ``transaction`` matters to stamping; built once (a Flags costs more to
# build than the rest of a small write's preparation).
_WRITE_FLAGS = {False: Flags(), True: Flags(transaction=True)}


# The epoch of the write this task just answered (read by the HTTP layer for its header).
ANSWERED_EPOCH: contextvars.ContextVar[int | None] = contextvars.ContextVar("answered_epoch", default=None)


class StaleRead(errors.NodeError):
    """A ``level=none`` read with ``freshness`` on a node that cannot show it is fresh enough. 503, not 200
    with an error per statement as rqlite answers: nothing ran, and another node (or later) may serve it."""

    status = 503
    code = "stale_read"


def staleness(
    status: machine.Status | None, applied_index: int, now: float, freshness_s: float, strict: bool
) -> str | None:
    """Why a ``level=none`` read bounded by ``freshness_s`` must not be served here (None: serve it).

    ``now`` and ``status.leader_contact_s`` are the same monotonic clock (the Replicator's loop clock).
    A writable leader always passes (rqlite ignores freshness on the leader); a leader that is not writable
    (it lost majority contact, or is handing over) does not, since another node may lead by now.
    """
    if status is None:
        return "stale read: this node has not joined a cluster yet"
    if status.role == machine.LEADER:
        return None if status.writable else "stale read: this node leads but has no majority contact"
    if status.leader_contact_s == machine.NEVER:
        return "stale read: this node has not heard from a leader since it started"
    since_s = max(0.0, now - status.leader_contact_s)
    if since_s > freshness_s:
        return f"stale read: last contact with the leader {since_s:.1f} s ago > freshness {freshness_s:g}s"
    if strict and applied_index < status.leader_commit:
        return (
            f"stale read: applied index {applied_index} is behind the leader's commit index "
            f"{status.leader_commit} (freshness_strict)"
        )
    return None


class LoadNotStaged(errors.NodeError):
    """A file load that no majority of voters could stage in time: nothing was proposed, nothing changed."""

    status = 503
    code = "load_not_staged"


class LoadNotApplied(errors.NodeError):
    """A load stopped before its end was submitted: certainly not applied anywhere."""

    status = 503
    code = "load_not_applied"


class ReplicatedDataService:
    def __init__(
        self,
        database: Database,
        replicator: Replicator,
        *,
        wall_clock_ns: Callable[[], int] = time.time_ns,
        seeds: Callable[[], int] | None = None,
        log_reserve_bytes: int = 0,
    ) -> None:
        self.database = database
        self.replicator = replicator
        # The Replicator's log has no reserve of its own (an append that fails stops the node), so writes are
        # refused here, before they are stamped, while DATA_DIR has less than the reserve free.
        self._reserve_bytes = log_reserve_bytes
        self._space_checked_s = float("-inf")
        self._space_short: str | None = None
        self._wall_clock_ns = wall_clock_ns
        self._seeds = seeds if seeds is not None else UrandomSeeds()
        self._load_lock = asyncio.Lock()

    def _reserve_known(self) -> bool:
        """Whether the last look at DATA_DIR's free space still holds (or there is no reserve): then
        :meth:`_require_reserve` need not be awaited, only :meth:`_raise_if_short` called."""
        return self._reserve_bytes <= 0 or time.monotonic() - self._space_checked_s < SPACE_CHECK_S

    def _raise_if_short(self) -> None:
        if self._space_short is not None:
            raise errors.InsufficientStorage(self._space_short)

    async def _require_reserve(self) -> None:
        if self._reserve_bytes <= 0:
            return
        now = time.monotonic()
        if now - self._space_checked_s >= SPACE_CHECK_S:
            self._space_checked_s = now  # before the await: concurrent writes use this verdict meanwhile
            try:
                free = await asyncio.to_thread(free_bytes, self.database.data_dir)
            except OSError:
                free = None  # unreadable DATA_DIR: the log append reports the real problem
            reserve = self._reserve_bytes
            self._space_short = (
                None
                if free is None or free >= reserve
                else f"DATA_DIR has {free} bytes free, below LOG_RESERVE_BYTES ({reserve}); nothing was stored"
            )
        if self._space_short is not None:
            raise errors.InsufficientStorage(self._space_short)

    def _database_first(self) -> None:
        """While this node's own database is being checked, or is corrupt, its replication waits for it: that
        is the reason to give (database_checking, database_corrupt), not the 'no leader' that follows."""
        if not self.database.is_open:
            self.database.require_ready()
        self.require_local_copy()

    def require_local_copy(self) -> None:
        """Raise while this node's copy stands for nothing: its damaged data was quarantined and no cluster
        has taken it back yet, so an empty database must not pass for the data it lost (reads, backups)."""
        rejoin = self.replicator.awaiting_rejoin()
        if rejoin is not None:
            raise errors.DatabaseCorrupt(rejoin)

    async def submit(self, request: WriteRequest, client: str) -> WriteOutcome:
        self._database_first()
        if self._reserve_known():  # the common case: no coroutine for a verdict already at hand
            self._raise_if_short()
        else:
            await self._require_reserve()
        time_ns, seed = self._wall_clock_ns(), self._seeds()
        db_request = DbRequest(request.statements, _WRITE_FLAGS[bool(request.transaction)])

        def prepare() -> tuple[Command, bytes]:
            write = stamp_write(db_request, time_ns=time_ns, seed=seed)
            command = Command(
                write, unified=request.unified, client=client, request_id=request.request_id,
                sqlite_version=self.database.sqlite_version,
            )  # fmt: skip
            return command, codec.encode_command(command)

        # Stamping and encoding are per-character work: a large write is prepared off the event loop; a small
        # one (the common single INSERT) costs less than the two thread switches of moving it there.
        if _inline_size(request) <= INLINE_PREPARE_BYTES:
            command, payload = prepare()
        else:
            command, payload = await asyncio.to_thread(prepare)
        # The command too: this leader applies it without decoding its own payload back (own_commands).
        epoch, index, applied = await self.replicator.submit(payload, WRITE_WAIT_S, command=command)
        ANSWERED_EPOCH.set(epoch)
        assert applied is not None
        return WriteOutcome(applied.results, epoch, applied.index, applied.duplicate, applied.committed)

    async def read(self, request: DbRequest, level: Level, client: str) -> list[StatementResult]:
        self._database_first()
        freshness_s = request.flags.freshness_s
        if level is Level.NONE and freshness_s is not None:
            why = staleness(
                self.replicator.status(), self.replicator.applied_index, asyncio.get_running_loop().time(),
                freshness_s, request.flags.freshness_strict,
            )  # fmt: skip
            if why is not None:
                raise StaleRead(why)
        if level in (Level.LINEARIZABLE, Level.STRONG):
            await self.replicator.confirm_read(READ_CONFIRM_S)
        elif level is not Level.NONE and not self.replicator.is_leader():
            # The middleware forwards weak/auto reads to a healthy leader; here there is none to ask.
            if self.replicator.stopping:
                raise errors.Unavailable("this node is shutting down; retry on another node")
            status = self.replicator.status()
            raise errors.NotLeader(
                "no healthy leader to serve a weak read; use level=none for this node's copy",
                None if status is None else self.replicator.url_of(status.leader),
            )
        return await self.database.query(request, client=client)

    async def load_sqlite_file(
        self, path: Path, *, client: str = "", request_id: str | None = None
    ) -> LoadOutcome:
        """See the module docstring. ``path`` (the upload in DATA_DIR) is moved into the staged files."""
        if self._load_lock.locked():
            raise errors.Busy("another /db/load is running on this node; retry when it has answered")
        async with self._load_lock:
            self._require_leader()
            size = (await asyncio.to_thread(os.stat, path)).st_size
            # The staged file is the upload, moved; the swap consumes a copy of it: one size more.
            await asyncio.to_thread(self._check_space, size)
            await asyncio.to_thread(check_sqlite_file, path)
            loads = self.replicator.snapshots.loads
            staged = await asyncio.to_thread(loads.stage_local, path)
            wait_s = load_end_wait_s(staged.size_bytes)
            await self._stage_on_majority(staged.sha256, staged.size_bytes, wait_s)
            command = Command(
                WriteCommand((), False, 0, 0), client=client, request_id=request_id,
                sqlite_version=self.database.sqlite_version,
                load=LoadFile(staged.sha256, staged.size_bytes),
            )  # fmt: skip
            payload = codec.encode_command(command)
            try:
                if request_id is not None:
                    epoch, index, applied = await self._submit_again_if_unknown(payload, wait_s)
                else:  # without an ID a second entry would load the file again: one attempt
                    epoch, index, applied = await self.replicator.submit(payload, wait_s)
            except (errors.NotLeader, errors.NoQuorum, errors.Busy, NotWritable, Discarded) as exc:
                raise LoadNotApplied(f"the load was not applied: {exc}; retry it") from None
        ANSWERED_EPOCH.set(epoch)
        assert applied is not None
        (result,) = applied.results
        if result.error is not None:
            raise errors.BadRequest(result.error)  # its request ID names another file
        return LoadOutcome(0, epoch, applied.index)

    def _require_leader(self) -> None:
        if not self.replicator.is_leader():
            status = self.replicator.status()
            leader = None if status is None else self.replicator.url_of(status.leader)
            raise errors.NotLeader("this node does not lead: send the load to the leader", leader)

    async def _stage_on_majority(self, sha256: str, size_bytes: int, wait_s: float) -> None:
        """Have the other members pull the staged file; return once a majority of voters (this leader
        included) hold it durably, after waiting at most STAGE_GRACE_S more for the rest (a member that
        misses it fetches it when it applies the load). 503 ``load_not_staged`` when no majority did within
        ``wait_s``: nothing is proposed."""
        replicator = self.replicator
        state, me = replicator.state, replicator.identity
        signer = replicator.transport.signer if replicator.transport is not None else None
        if state is None or me is None or signer is None:
            raise errors.Unavailable("replication has not started on this node yet")
        voters = frozenset(state.config.voters)
        peers = sorted((voters | frozenset(state.config.learners)) - {me})
        staged: set[str] = {me}
        failures: dict[str, str] = {}
        loop = asyncio.get_running_loop()
        started = loop.time()
        connector = aiohttp.TCPConnector(limit=max(1, len(peers)))
        async with aiohttp.ClientSession(connector=connector) as session:
            tasks: dict[asyncio.Future, str] = {}
            for identity in peers:
                url = replicator.url_of(identity)
                if url is None:
                    failures[identity] = "address unknown"
                    continue
                ask = staged_loads.ask_to_stage(
                    session, url, sha256, size_bytes, signer=signer, timeout_s=wait_s
                )
                tasks[asyncio.ensure_future(ask)] = identity
            pending = set(tasks)
            try:
                # Bounded: every task ends within wait_s (its own timeout), and each round ends at least one.
                while pending and not staged_majority(voters, staged):
                    done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                    _count_staged(done, tasks, staged, failures)
                if pending:
                    done, pending = await asyncio.wait(pending, timeout=STAGE_GRACE_S)
                    _count_staged(done, tasks, staged, failures)
            finally:
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
        took_ms = round((loop.time() - started) * 1000, 1)
        holders = sorted(staged & voters)
        log = replicator.log
        if not staged_majority(voters, staged):
            log.warning(
                "replicated_load_not_staged", sha256=sha256[:16], bytes=size_bytes, voters=len(voters),
                staged_voters=len(holders), failures=failures, took_ms=took_ms,
            )  # fmt: skip
            raise LoadNotStaged(
                f"the SQLite file could not be staged on a majority of voters ({len(holders)} of "
                f"{len(voters)} hold it, {staged_loads.majority_of(len(voters))} needed: "
                f"{'; '.join(f'{k[:12]}: {v}' for k, v in failures.items())[:600]}); nothing was changed, "
                "retry when more nodes are up"
            )
        log.info(
            "replicated_load_staged", sha256=sha256[:16], bytes=size_bytes, voters=len(voters),
            staged=len(staged), staged_voters=len(holders), missing=sorted(failures)[:8], took_ms=took_ms,
        )  # fmt: skip

    async def load_dump_file(
        self, path: Path, *, client: str = "", request_id: str | None = None
    ) -> LoadOutcome:
        """See the module docstring. Raises 400 for a dump that fails (nothing applied anywhere)."""
        if self._load_lock.locked():
            raise errors.Busy("another /db/load is running on this node; retry when it has answered")
        async with self._load_lock:
            if not self.replicator.is_leader():
                status = self.replicator.status()
                leader = None if status is None else self.replicator.url_of(status.leader)
                raise errors.NotLeader("this node does not lead: send the load to the leader", leader)
            size = (await asyncio.to_thread(os.stat, path)).st_size
            await asyncio.to_thread(self._check_space, LOAD_SPACE_FACTOR * size)
            # Already applied (a retry)? Then ship no chunks: the end alone answers the first outcome.
            ship = request_id is None or not await self._request_seen(client, request_id)
            time_ns, seed = self._wall_clock_ns(), self._seeds() & ((1 << 63) - 1)
            load_id = secrets.token_hex(8)
            chunks, statements, digest = await self._ship_chunks(path, load_id, ship)
            end = Command(
                WriteCommand((), False, time_ns, seed), client=client, request_id=request_id,
                sqlite_version=self.database.sqlite_version,
                load=LoadEnd(load_id, chunks, statements, digest),
            )  # fmt: skip
            wait_s = load_end_wait_s(size)
            payload = codec.encode_command(end)
            try:
                if request_id is not None:
                    epoch, index, applied = await self._submit_again_if_unknown(payload, wait_s)
                else:  # without an ID a second end could not tell it was applied: one attempt
                    epoch, index, applied = await self.replicator.submit(payload, wait_s)
            except (errors.NotLeader, errors.NoQuorum, errors.Busy, NotWritable, Discarded) as exc:
                # Refused before it was appended, or overwritten: the load did not happen.
                await self._abort(load_id, chunks)
                raise LoadNotApplied(f"the load was not applied: {exc}; retry it") from None
        ANSWERED_EPOCH.set(epoch)
        assert applied is not None
        (result,) = applied.results
        if result.error is not None:
            if result.status is not Status.ROLLED_BACK:
                raise errors.BadRequest(result.error)  # the dump failed: the same on every replica
            if "COMMIT failed" in result.error:  # a local failure on the leader
                raise errors.Unavailable(f"the load could not be stored on the leader: {result.error}")
            raise LoadNotApplied(f"{result.error}; retry it")
        return LoadOutcome(result.rows_affected or 0, epoch, applied.index)

    async def _request_seen(self, client: str, request_id: str) -> bool:
        def seen(job: object) -> bool:
            ops = self.database._ops(job)  # type: ignore[arg-type]
            rows = ops.internal(
                "SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = ?",
                (statemachine.REQUESTS_TABLE,),
            )
            if not rows:
                return False
            return bool(
                ops.internal(
                    f"SELECT 1 FROM {statemachine.REQUESTS_TABLE} WHERE client = ? AND request_id = ?",
                    (client, request_id),
                )
            )

        return await self.database._write(seen)

    def _check_space(self, need_bytes: int) -> None:
        """Blocking: 507 unless DATA_DIR keeps LOG_RESERVE_BYTES free after ``need_bytes`` more."""
        st = os.statvfs(self.database.data_dir)
        free = st.f_bavail * st.f_frsize
        if free < need_bytes + self._reserve_bytes:
            raise errors.InsufficientStorage(
                f"not enough disk space in DATA_DIR for this load: about {need_bytes} bytes are needed beyond "
                f"the {self._reserve_bytes}-byte reserve (LOG_RESERVE_BYTES) and {free} are free; nothing "
                "was applied"
            )

    async def _ship_chunks(self, path: Path, load_id: str, ship: bool) -> tuple[int, int, str]:
        """Submit the dump's chunks (``ship``) or only count and hash them; (chunks, statements, digest)."""
        version = self.database.sqlite_version
        digest = LoadDigest()
        counts = [0, 0]  # chunks, statements
        source = _stamped_chunks(path)
        # A step may still run in its thread after this coroutine was cancelled (a thread cannot be): the
        # generator is closed under the same lock, after it, never while it executes.
        source_lock = threading.Lock()

        def close_source() -> None:
            with source_lock:
                source.close()

        def step() -> bytes | None:
            with source_lock:
                return locked_step()

        def locked_step() -> bytes | None:
            """One chunk, in a thread: read, split, stamp, hash, encode (the generator keeps its place)."""
            chunk = next(source, None)
            if chunk is None:
                return None
            digest.update(chunk)
            seq = counts[0]
            counts[0] += 1
            counts[1] += len(chunk)
            if not ship:
                return b""
            self._check_space(2 * (LOAD_CHUNK_BYTES + LOAD_ENVELOPE_BYTES))
            load = LoadChunk(load_id, seq, tuple(chunk))
            return codec.encode_command(
                Command(WriteCommand((), False, 0, 0), sqlite_version=version, load=load)
            )

        inflight: set[asyncio.Task] = set()
        try:
            for _ in range(1 << 40):  # bounded by the dump's size: each step consumes at least one statement
                payload = await asyncio.to_thread(step)
                if payload is None:
                    break
                if not payload:
                    continue
                while len(inflight) >= LOAD_WINDOW:
                    done, inflight = await asyncio.wait(inflight, return_when=asyncio.FIRST_COMPLETED)
                    _raise_first(done)
                inflight.add(asyncio.ensure_future(self._submit_chunk(payload)))
            if inflight:
                done, inflight = await asyncio.wait(inflight)
                _raise_first(done)
        except (errors.NodeError, OSError) as exc:  # OSError: the upload file could not be read
            for task in inflight:
                task.cancel()
            await asyncio.gather(*inflight, return_exceptions=True)
            inflight = set()
            if isinstance(exc, errors.BadRequest | errors.InsufficientStorage):
                await self._abort(load_id, counts[0])
                raise
            await self._abort(load_id, counts[0])
            raise LoadNotApplied(
                f"the load was not applied: shipping its chunks failed ({exc}); retry it"
            ) from None
        finally:
            for task in inflight:
                task.cancel()
            await asyncio.gather(*inflight, return_exceptions=True)
            await asyncio.to_thread(close_source)
        return counts[0], counts[1], digest.hexdigest()

    async def _submit_chunk(self, payload: bytes) -> None:
        await self._submit_again_if_unknown(payload, WRITE_WAIT_S)

    async def _submit_again_if_unknown(self, payload: bytes, timeout_s: float) -> tuple:
        """Submit an idempotent entry; again while this node still leads, when its outcome is unknown or the
        leader is briefly unable to commit (a lease lapse on a busy machine), so a transient blip does not
        cost a whole load. Idempotent: a chunk (staging it twice gives the same rows, by (load, seq)), and
        an end that carries a request ID (a second one answers the first's stored outcome). Bounded."""
        delay = LOAD_CHUNK_RETRY_FIRST_S
        unknown: OutcomeUnknown | None = None  # an attempt that may still commit: never report "not applied"
        for attempt in range(LOAD_CHUNK_ATTEMPTS):
            try:
                return await self.replicator.submit(payload, timeout_s)
            except errors.NodeError as exc:
                if isinstance(exc, OutcomeUnknown):
                    unknown = exc
                transient = isinstance(exc, OutcomeUnknown | errors.NoQuorum | errors.Busy | NotWritable)
                if not transient or attempt + 1 == LOAD_CHUNK_ATTEMPTS or not self.replicator.is_leader():
                    raise (unknown or exc) from None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _abort(self, load_id: str, chunks: int) -> None:
        """Best effort: replicas drop what was staged for this load (else the next load drops it)."""
        if not chunks:
            return
        end = Command(
            WriteCommand((), False, 0, 0), sqlite_version=self.database.sqlite_version,
            load=LoadEnd(load_id, chunks, 0, "0" * 64, abort=True),
        )  # fmt: skip
        with contextlib.suppress(errors.NodeError):
            await self.replicator.submit(codec.encode_command(end), WRITE_WAIT_S)


def load_end_wait_s(size_bytes: int) -> float:
    return LOAD_END_WAIT_S + LOAD_END_WAIT_S_PER_MIB * size_bytes / (1 << 20)


def load_answer_within_s(body_read_timeout_s: float, max_load_bytes: int) -> float:
    """An upper bound of a load's answer time (receiving, shipping, its end's wait): how long a follower
    that forwards a load waits for the leader's answer."""
    return body_read_timeout_s + 2 * load_end_wait_s(max_load_bytes)


def _stamped_chunks(path: Path) -> Iterator[list[str]]:
    """The dump's statements, time keywords rewritten once (here, on the leader), packed into chunks."""
    statements = (rewrite_time_keywords(sql) for sql in dump_statements(path, MAX_LOAD_STATEMENT_BYTES))
    return chunk_statements(statements, LOAD_CHUNK_BYTES, MAX_LOAD_STATEMENT_BYTES)


def _count_staged(
    done: set[asyncio.Future], tasks: dict[asyncio.Future, str], staged: set[str], failures: dict[str, str]
) -> None:
    """Record which peers answered a stage request with the file held (``staged``), and why the others
    did not (``failures``)."""
    for task in done:
        exc = task.exception()
        if exc is None:
            staged.add(tasks[task])
        else:
            failures[tasks[task]] = str(exc)[:200]


def _raise_first(done: set[asyncio.Task]) -> None:
    """Raise the first failure among ``done``, after retrieving every one (none is left unobserved)."""
    failures = [exc for task in done if (exc := task.exception()) is not None]
    if failures:
        raise failures[0]
