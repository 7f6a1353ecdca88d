"""``python -m node recover``: make this stopped node the sole voter of a new cluster that keeps its data.

For the permanent loss of a majority of voters (the rules and the reasons: ``node.core.replication.recovery``).
Unsafe by nature, so explicit: without ``--yes-i-may-lose-writes`` it only prints what it would do and
exits 2; with it, it writes and prints what it did. Run it on ONE survivor (the one with the most advanced
log: a dry run on each prints its last entry) while the node is stopped.

Steps, each blocking (no event loop runs here):

1. Refuse unless run as the user owning DATA_DIR's files (what it writes must stay readable by the node),
   then take the DATA_DIR lock the node takes (``node.storage.dirlock``): refused while a node runs on it.
2. Read, never create: the identity, the replication hard state, the log (opening it runs the same crash
   recovery as a node start: a torn tail is cut), the database's applied index (for the summary only).
3. Compute the plan (pure: ``recovery.plan``) and print it. A dry run stops here: it changes nothing the
   node's own next start would not change too (a torn log tail is cut when the log is opened).
4. Confirmed: save the new hard state (temp file, fsync, rename, fsync the directory), THEN append the
   CONFIG entry and fsync the log. Killed between the two, a re-run finishes (appends the entry); killed
   before the first, nothing changed; a re-run after both changes nothing (the order's reasons: the
   recovery module's docstring).

Exit status: 0 recovered (or nothing left to do), 1 an I/O error or unreadable state (nothing or, between
the two writes, only the hard state was written: run it again), 2 not confirmed, refused, or the DATA_DIR
is in use or is not a node's. Prints identities, cluster names, epochs and indices: nothing secret.
"""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path
from typing import TextIO

from node.core.replication import recovery
from node.core.replication.messages import LogId
from node.replication.codec import from_log_entry, to_log_entry
from node.storage import statemachine
from node.storage.corestate import load_core_hard_state, save_core_hard_state
from node.storage.dirlock import DataDirInUse, lock_data_dir
from node.storage.identity import IDENTITY_FILE_NAME, IdentityError, load_or_create_identity
from node.storage.log import LOG_DIR_NAME, DurableLog, LogError
from node.storage.sqlite import DB_FILE_NAME

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
CONFIRM_FLAG = "--yes-i-may-lose-writes"
_READ_BYTES = 1 << 20


class _Stop(Exception):
    """Print the message and exit with the status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def recover(data_dir: Path, *, confirmed: bool, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """The command. Returns the exit status; prints the summary on ``out`` (stdout), refusals and errors on
    ``err`` (stderr)."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    try:
        if not data_dir.is_dir():
            raise _Stop(EXIT_USAGE, f"{data_dir} is not a directory (give the node's DATA_DIR)")
        if not (data_dir / IDENTITY_FILE_NAME).is_file():
            raise _Stop(EXIT_USAGE, f"{data_dir} holds no node identity: it is not a node's DATA_DIR")
        owner = (data_dir / IDENTITY_FILE_NAME).stat().st_uid
        if os.geteuid() != owner:
            # Files this command writes (hard state, log segment) would belong to this user, mode 0600: the
            # node, running as the owner, could no longer read them and would not start.
            raise _Stop(
                EXIT_USAGE,
                f"run this as the user that owns {data_dir} (uid {owner}; this is uid {os.geteuid()}), e.g. "
                "with the node's image, which runs as uid 10001",
            )
        try:
            lock = lock_data_dir(data_dir, create=False)
        except DataDirInUse as exc:
            raise _Stop(EXIT_USAGE, exc.strerror or str(exc)) from None
        with lock:
            return _recover_locked(data_dir, confirmed=confirmed, out=out)
    except _Stop as stop:
        print(f"talentnest-node recover: {stop}", file=err)
        return stop.status
    except (OSError, LogError, IdentityError, RuntimeError) as exc:
        print(f"talentnest-node recover: failed: {exc}", file=err)
        return EXIT_FAILED


def _recover_locked(data_dir: Path, *, confirmed: bool, out: TextIO) -> int:
    identity = load_or_create_identity(data_dir)  # the file exists (checked): this only reads it
    hard = load_core_hard_state(data_dir, identity)
    if hard is None:
        raise _Stop(EXIT_USAGE, recovery.NO_HARD_STATE)
    log_dir = data_dir / LOG_DIR_NAME
    if not log_dir.is_dir():
        raise _Stop(EXIT_USAGE, f"{log_dir} does not exist: this node holds no log to keep")
    log = DurableLog.open(log_dir)
    try:
        last_epoch, last_index = log.last()
        last_entry = None
        if last_index >= log.first_index:
            last_entry = from_log_entry(log.read(last_index, _READ_BYTES)[0])
        applied = applied_index(data_dir / DB_FILE_NAME)
        try:
            p = recovery.plan(
                identity, hard, LogId(last_epoch, last_index), last_entry,
                recovery.RECOVERED_PREFIX + uuid.uuid4().hex,
            )  # fmt: skip
        except recovery.Refused as exc:
            raise _Stop(EXIT_USAGE, str(exc)) from None
        out.write(describe(p, data_dir, applied, first_index=log.first_index))
        if p.action is recovery.Action.DONE:
            out.write("Nothing to do: this node already is the only voter of the recovered cluster.\n")
            return EXIT_OK
        if not confirmed:
            out.write(f"Dry run: nothing was changed. Run again with {CONFIRM_FLAG} to do it.\n")
            return EXIT_USAGE
        if p.action is recovery.Action.RECOVER:
            # 1. The new cluster name, epoch, promise and configuration history, atomically and durably.
            save_core_hard_state(data_dir, p.hard, identity)
        # 2. Then the entry that makes this node the only voter, durably. (RECOVER and FINISH alike.)
        log.append([to_log_entry(p.entry)])
        log.sync()
    finally:
        log.close()
    out.write(
        f"Recovered: {data_dir} now holds cluster {p.cluster} with this node as its only voter. Start the node;\n"
        "then start every other node with an EMPTY DATA_DIR (see above).\n"
    )
    return EXIT_OK


class _ReadOps:
    """The one method ``statemachine.applied_index`` needs, on a plain connection."""

    def __init__(self, conn: object) -> None:
        self._conn = conn

    def internal(self, sql: str, params: tuple = ()) -> list[tuple]:
        return list(self._conn.execute(sql, params))  # type: ignore[attr-defined]


def applied_index(db_path: Path) -> int:
    """The database's durably applied index (0 without a database). For the summary: recovery keeps the log
    whole, and the node applies whatever it has not applied yet once it leads."""
    if not db_path.is_file():
        return 0
    import apsw  # here: the rest of the command needs no SQLite

    # Read-only: reads the WAL without checkpointing it, so a dry run leaves the database and its WAL as they
    # are (only the -shm index, which holds no data, may be rebuilt). SQLite creates an empty -wal and a
    # -shm when they are missing: those are removed again (we hold the DATA_DIR lock: no other user).
    sidecars = [db_path.with_name(db_path.name + suffix) for suffix in ("-wal", "-shm")]
    missing = [p for p in sidecars if not p.exists()]
    conn = apsw.Connection(str(db_path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return statemachine.applied_index(_ReadOps(conn))  # type: ignore[arg-type]
    finally:
        conn.close()
        wal = sidecars[0]
        if wal in missing and wal.exists() and wal.stat().st_size == 0:
            for created in missing:
                created.unlink(missing_ok=True)


def describe(p: recovery.Plan, data_dir: Path, applied: int, *, first_index: int) -> str:
    """The summary an operator reads before (dry run) and after confirming."""
    old, new = p.old, p.hard
    unapplied = (
        f"entries {applied + 1}..{p.last.index} are in the log but not applied here: they may never have been "
        "committed (nor acknowledged to a client); they are kept and become committed too"
        if p.last.index > applied
        else "every entry in the log is applied here"
    )
    lines = [
        f"DATA_DIR:          {data_dir}",
        f"this node:         identity {p.me}",
        f"old cluster:       {old.cluster or '(unnamed)'}, epoch {old.epoch}, "
        f"{len(p.old_voters)} voter(s) in the last configuration known here",
        f"log kept:          entries {first_index}..{p.last.index}; last entry epoch {p.last.epoch}, index "
        f"{p.last.index}"
        if first_index <= p.last.index
        else f"log kept:          no entry (compacted up to epoch {p.last.epoch}, index {p.last.index})",
        f"database applied:  index {applied}",
        "",
    ]
    if p.action is recovery.Action.RECOVER:
        lines += [
            "Plan (unsafe by nature: it may lose the last acknowledged writes):",
            f"  1. hard state: new cluster {new.cluster} (a random name, drawn again at each run), epoch "
            f"{new.epoch} promised to this node, configuration history ending with entry {p.entry.index}",
            f"  2. log: append a CONFIG entry at index {p.entry.index}, epoch {p.entry.epoch}, naming this node "
            "the ONLY voter (no learners)",
        ]
    elif p.action is recovery.Action.FINISH:
        lines += [
            f"An earlier recover was interrupted: the hard state already names cluster {new.cluster} (epoch "
            f"{new.epoch});",
            f"  plan: append the missing CONFIG entry at index {p.entry.index}, epoch {p.entry.epoch}, naming "
            "this node the ONLY voter",
        ]
    else:
        lines.append(f"Already recovered: cluster {new.cluster}, epoch {new.epoch}, entry {p.entry.index}.")
    lines += [
        "",
        "What it means:",
        f"  - KEPT: every entry in this log up to index {p.last.index}; when the node starts it leads alone and "
        "commits all of them;",
        f"    {unapplied}.",
        f"  - LOST: writes the lost nodes acknowledged that are not in this log (anything after epoch "
        f"{p.last.epoch}, index {p.last.index}).",
        "    Run this on the survivor with the most advanced log: a dry run on each prints its last entry;",
        "    the higher last epoch wins, then the higher last index.",
        "  - OTHER NODES: every other node must start with an EMPTY DATA_DIR (a new volume). It then joins this",
        "    node as a learner and is promoted to voter once it has caught up. A node started with the old",
        f"    cluster's data is refused (it belongs to cluster {old.cluster or '(unnamed)'}; this one is now",
        f"    {new.cluster}) and reports cluster_conflict: stop it and empty its DATA_DIR.",
        "",
    ]
    return "\n".join(lines)
