"""Where a replicated write's *latency* goes, stage by stage, measured inside the nodes of a benchmark run.

``replication_profile.py --timeline`` starts its nodes with this module installed (through a
``sitecustomize`` on their ``PYTHONPATH``, see :func:`sitecustomize_source`): it wraps a few methods of the
node with timestamping shims, so the product carries no tracing code. Each node process then appends what
it measured since the last time, as one JSON line, to ``TN_TIMELINE_DIR/<pid>.jsonl`` every half second
(only the new rows: serialising everything again each time held the GIL long enough to show in the
latencies measured); the profile prints them as a table
(:func:`format_table`). Only for benchmarks: the shims cost CPU, and they depend on internal method names
(a rename fails loudly at install, see :data:`HOOKS`).

The stages of one write on the node that leads (index ``i``), each from the end of the previous one:

====================  ===================================================================================
read -> submitted     the request was read (fast path) until the replicator took the command
submitted -> sent     until the first Append holding ``i`` went to a follower (batching: the log's open
                      tail waits for the previous Append's answer)
sent -> acked         until the first follower's ack covering ``i`` arrived (network, the follower's loop,
                      its log write and fsync; the follower's own share is the ``follower`` row)
acked -> committed    until the Ready that commits ``i`` was queued (the core's step)
committed -> applying until the database was asked to apply it (the Ready queue's order, the applier)
applying              the database call: the hand-off to its thread, SQLite, the hand-off back (for a
                      write the leader staged before its commit, see Replicator._stage_sent: its COMMIT)
applied -> resumed    until the waiting request's task ran again
resumed -> written    until its answer was written to the socket
written -> next read  from that answer until the same connection's next request was read: the client's
                      turn-around and both network legs (what the node cannot shorten)
====================  ===================================================================================

``follower`` (on each follower): from an Append's arrival until its ack was sent.
"""

from __future__ import annotations

import contextvars
import json
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

STAGES = (
    "read -> submitted",
    "submitted -> sent",
    "sent -> acked",
    "acked -> committed",
    "committed -> applying",
    "applying",
    "applied -> resumed",
    "resumed -> written",
)
TURNAROUND = "written -> next read"
FOLLOWER = "follower: append -> ack"
MAX_ROWS = 200_000  # per process: a run of a minute at a few thousand writes/s
MAX_PENDING = 100_000  # per-index bookkeeping; beyond it (a stuck write) it is cleared, losing a few rows
DUMP_EVERY_S = 0.5
# (module, class, method): what install() wraps. A missing one raises at install, never silently measures
# nothing.
HOOKS = (
    ("node.actors.replicator", "Replicator", "submit"),
    ("node.actors.replicator", "Replicator", "receive"),
    ("node.actors.replicator", "Replicator", "_send"),
    ("node.actors.replicator", "Replicator", "_queue_unsynced"),
    ("node.storage.sqlite", "Database", "apply_entries"),
    ("node.storage.sqlite", "Database", "stage_entries"),
    ("node.storage.sqlite", "Database", "commit_staged"),
    ("node.http.server", "GuardedRequestHandler", "_fast_take"),
    ("node.http.server", "GuardedRequestHandler", "_fast_write"),
)


# ------------------------------------------------------------------ pure part: figures from rows


def stage_durations(marks: Mapping[str, float | None]) -> list[float | None]:
    """One write's stage durations (seconds, in STAGES order) from its marks: the times ``read``,
    ``submitted``, ``sent``, ``acked``, ``committed``, ``applying``, ``applied``, ``resumed``, ``written``
    (any may be None: that stage and the next are then unknown)."""
    names = ("read", "submitted", "sent", "acked", "committed", "applying", "applied", "resumed", "written")
    out: list[float | None] = []
    for before, after in zip(names, names[1:], strict=False):
        a, b = marks.get(before), marks.get(after)
        out.append(None if a is None or b is None else b - a)
    return out


def _percentile(values: Sequence[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))]


def summarize(columns: Mapping[str, Iterable[float]]) -> dict[str, dict[str, float]]:
    """Per stage: count, mean, p50 and p90 (milliseconds) of its durations; stages without any are left out."""
    out: dict[str, dict[str, float]] = {}
    for name, values in columns.items():
        ordered = sorted(v for v in values if v is not None)
        if not ordered:
            continue
        out[name] = {
            "n": len(ordered),
            "mean_ms": 1000 * sum(ordered) / len(ordered),
            "p50_ms": 1000 * _percentile(ordered, 0.5),
            "p90_ms": 1000 * _percentile(ordered, 0.9),
        }
    return out


def format_table(summary: Mapping[str, Mapping[str, float]], title: str) -> str:
    """The stages that have figures, in STAGES order, then the turn-around and the follower's share; the
    last column is each stage's part of the leader's read-to-written total (sum of the stage means)."""
    leader_total = sum(summary[s]["mean_ms"] for s in STAGES if s in summary)
    lines = [title, f"  {'stage':24s} {'n':>7s} {'mean ms':>8s} {'p50 ms':>7s} {'p90 ms':>7s} {'share':>6s}"]
    for name in (*STAGES, TURNAROUND, FOLLOWER):
        row = summary.get(name)
        if row is None:
            continue
        share = f"{100 * row['mean_ms'] / leader_total:5.0f}%" if name in STAGES and leader_total else ""
        lines.append(
            f"  {name:24s} {row['n']:7.0f} {row['mean_ms']:8.2f} {row['p50_ms']:7.2f} {row['p90_ms']:7.2f} "
            f"{share:>6s}"
        )
    if leader_total:
        lines.append(f"  {'read -> written (sum)':24s} {'':7s} {leader_total:8.2f}")
    return "\n".join(lines)


def merge(dumps: Iterable[Mapping[str, Any]], since: float) -> dict[str, list[float]]:
    """Columns (stage -> durations) of every process's dump, rows stamped at or after ``since`` (wall time)
    only: the warm-up before the measured period is left out."""
    columns: dict[str, list[float]] = {name: [] for name in (*STAGES, TURNAROUND, FOLLOWER)}
    for dump in dumps:
        for at, durations in dump.get("writes", ()):
            if at >= since:
                for name, value in zip(STAGES, durations, strict=True):
                    if value is not None:
                        columns[name].append(value)
        for key in (TURNAROUND, FOLLOWER):
            columns[key].extend(v for at, v in dump.get(key, ()) if at >= since)
    return columns


def read_dumps(directory: Path) -> list[dict[str, Any]]:
    """Every dump line of every process (each names its ``pid``); a line being written is skipped."""
    dumps = []
    for path in sorted(directory.glob("*.jsonl")):
        try:
            lines = path.read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            try:
                dumps.append(json.loads(line))
            except ValueError:
                continue  # the last line, still being appended
    return dumps


def sitecustomize_source(repo: Path) -> str:
    """A ``sitecustomize.py`` that installs the shims in a node process started with TN_TIMELINE_DIR set."""
    return (
        "import os, sys\n"
        "if os.environ.get('TN_TIMELINE_DIR'):\n"
        f"    sys.path.insert(0, {str(repo)!r})\n"
        "    from bench import write_timeline\n"
        "    write_timeline.install(os.environ['TN_TIMELINE_DIR'])\n"
    )


# ------------------------------------------------------------------ the shims (in a node process)


class _Recorder:
    """Marks per log index, rows once a write is answered; dumped by a daemon thread."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / f"{os.getpid()}.jsonl"
        self.lock = threading.Lock()
        self.sent: dict[int, float] = {}
        self.acked: dict[int, float] = {}
        self.committed: dict[int, float] = {}
        self.applying: dict[int, float] = {}
        self.applied: dict[int, float] = {}
        self.last_ack = 0
        self.last_applied = 0
        self.staged: dict[int, list[int]] = {}  # id() of a staged group's token -> its indices
        self.append_seen: dict[int, float] = {}
        self.writes: list[tuple[float, list[float | None]]] = []
        self.turnaround: list[tuple[float, float]] = []
        self.follower: list[tuple[float, float]] = []
        self.last_written: dict[int, float] = {}  # connection (id) -> when its last answer was written
        self.kept = 0  # rows dumped so far: recording stops at MAX_ROWS

    def bound(self) -> None:
        for table in (self.sent, self.acked, self.committed, self.applying, self.applied, self.append_seen):
            if len(table) > MAX_PENDING:
                table.clear()
        if len(self.last_written) > MAX_PENDING:
            self.last_written.clear()

    def row(
        self, index: int, read: float | None, submitted: float, resumed: float
    ) -> dict[str, float | None]:
        return {
            "read": read,
            "submitted": submitted,
            "sent": self.sent.pop(index, None),
            "acked": self.acked.pop(index, None),
            "committed": self.committed.pop(index, None),
            "applying": self.applying.pop(index, None),
            "applied": self.applied.pop(index, None),
            "resumed": resumed,
        }

    def dump(self) -> None:
        """Append the rows recorded since the last dump as one line (nothing when there are none)."""
        with self.lock:
            data = {
                "pid": os.getpid(),
                "writes": self.writes,
                TURNAROUND: self.turnaround,
                FOLLOWER: self.follower,
            }
            rows = len(self.writes) + len(self.turnaround) + len(self.follower)
            self.writes, self.turnaround, self.follower = [], [], []
            self.kept += rows
        if rows:
            with self.path.open("a") as out:
                out.write(json.dumps(data) + "\n")


_READ_AT: contextvars.ContextVar[float | None] = contextvars.ContextVar("tn_timeline_read", default=None)
_MARKS: contextvars.ContextVar[dict[str, float | None] | None] = contextvars.ContextVar(
    "tn_timeline_marks", default=None
)


def _lookup(module: str, cls: str, method: str) -> tuple[type, Callable[..., Any]]:
    import importlib

    owner = getattr(importlib.import_module(module), cls)
    original = owner.__dict__.get(method)
    if original is None:
        raise RuntimeError(f"write_timeline: {module}.{cls}.{method} is gone; update bench/write_timeline.py")
    return owner, original


def install(directory: str | os.PathLike[str]) -> _Recorder:
    """Wrap the methods in HOOKS of this process's node and start the dump thread."""
    from node.core.replication import messages as msg

    rec = _Recorder(Path(directory))
    clock, wall = time.perf_counter, time.time
    found = [_lookup(*hook) for hook in HOOKS]  # every one before any is wrapped

    def submit(original: Callable[..., Any]) -> Callable[..., Any]:
        async def wrapped(self: Any, *args: Any, **kwargs: Any) -> Any:
            read, submitted = _READ_AT.get(), clock()
            result = await original(self, *args, **kwargs)
            resumed = clock()
            marks = rec.row(result[1], read, submitted, resumed)
            _MARKS.set(marks)  # this task's answer is written next (_fast_write reads it)
            return result

        return wrapped

    def receive(original: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(self: Any, sender: Any, address: Any, messages: Any, *rest: Any, **kw: Any) -> Any:
            now = clock()
            for m in messages:
                kind = type(m)
                if kind is msg.AppendAck and m.match > rec.last_ack:
                    for index in range(max(rec.last_ack + 1, m.match - 4096), m.match + 1):
                        rec.acked.setdefault(index, now)
                    rec.last_ack = m.match
                elif kind is msg.Append and m.entries:
                    rec.append_seen[m.entries[-1].index] = now
            return original(self, sender, address, messages, *rest, **kw)

        return wrapped

    def send(original: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(self: Any, out: Any) -> Any:
            message, now = out.message, clock()
            kind = type(message)
            if kind is msg.Append:
                for entry in message.entries:
                    rec.sent.setdefault(entry.index, now)
            elif kind is msg.AppendAck:
                seen = rec.append_seen.pop(message.match, None)
                if seen is not None and rec.kept < MAX_ROWS:
                    with rec.lock:
                        rec.follower.append((wall(), now - seen))
            return original(self, out)

        return wrapped

    def queue_unsynced(original: Callable[..., Any]) -> Callable[..., Any]:
        async def wrapped(self: Any, item: Any) -> Any:
            now = clock()
            for entry in item.apply:
                rec.committed.setdefault(entry.index, now)
            return await original(self, item)

        return wrapped

    def apply_entries(original: Callable[..., Any]) -> Callable[..., Any]:
        async def wrapped(self: Any, entries: Any, *args: Any, **kwargs: Any) -> Any:
            start = clock()
            result = await original(self, entries, *args, **kwargs)
            end = clock()
            if entries:  # a run of entries
                last = entries[-1].index
                for index in range(max(rec.last_applied + 1, last - 4096), last + 1):
                    rec.applying[index] = start
                    rec.applied[index] = end
                rec.last_applied = max(rec.last_applied, last)
            rec.bound()
            return result

        return wrapped

    def fast_take(original: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(self: Any, buf: bytes) -> Any:
            now = clock()
            written = rec.last_written.pop(id(self), None)
            if written is not None and rec.kept < MAX_ROWS:
                with rec.lock:
                    rec.turnaround.append((wall(), now - written))
            token = _READ_AT.set(now)  # copied into the task the request is answered in
            try:
                return original(self, buf)
            finally:
                _READ_AT.reset(token)

        return wrapped

    def fast_write(original: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(self: Any, *args: Any, **kwargs: Any) -> Any:
            result = original(self, *args, **kwargs)
            now = clock()
            rec.last_written[id(self)] = now
            marks = _MARKS.get()
            if marks is not None:
                _MARKS.set(None)
                marks["written"] = now
                if rec.kept < MAX_ROWS:
                    with rec.lock:
                        rec.writes.append((wall(), stage_durations(marks)))
            return result

        return wrapped

    def note_staged(staged: Any, entries: Any) -> None:
        if staged is not None and entries:
            if len(rec.staged) > 64:
                rec.staged.clear()  # groups never committed (rolled back): forgotten
            rec.staged[id(staged[0])] = [e.index for e in entries]

    def stage_entries(original: Callable[..., Any]) -> Callable[..., Any]:
        async def wrapped(self: Any, entries: Any, *args: Any, **kwargs: Any) -> Any:
            staged = await original(self, entries, *args, **kwargs)
            note_staged(staged, entries)
            return staged

        return wrapped

    def commit_staged(original: Callable[..., Any]) -> Callable[..., Any]:
        async def wrapped(self: Any, token: Any, then: Any = (), *args: Any, **kwargs: Any) -> Any:
            start = clock()
            committed, staged = await original(self, token, then, *args, **kwargs)
            end = clock()
            indices = rec.staged.pop(id(token), [])
            if committed:
                for index in indices:
                    rec.applying[index] = start
                    rec.applied[index] = end
                rec.last_applied = max([rec.last_applied, *indices])
            if staged is not None:  # the staging of ``then``, queued behind the COMMIT
                staged.add_done_callback(
                    lambda f: note_staged(f.result(), then) if not f.cancelled() and not f.exception() else None
                )
            rec.bound()
            return committed, staged

        return wrapped

    shims = (
        submit, receive, send, queue_unsynced, apply_entries, stage_entries, commit_staged, fast_take,
        fast_write,
    )  # HOOKS' order; fmt: skip
    for (_, _, method), (owner, original), make in zip(HOOKS, found, shims, strict=True):
        setattr(owner, method, make(original))

    def dumper() -> None:
        while True:
            time.sleep(DUMP_EVERY_S)
            try:
                rec.dump()
            except OSError:
                continue

    global RECORDER
    RECORDER = rec
    threading.Thread(target=dumper, name="write-timeline", daemon=True).start()
    return rec


RECORDER: _Recorder | None = None  # this process's, once installed
