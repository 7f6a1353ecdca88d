"""The durable replication log: an append-only, checksummed, segmented log of commands, fsynced in groups.

Entries are ``(epoch, index, kind, payload)`` with contiguous indices from :attr:`DurableLog.first_index`
(which moves forward when :meth:`DurableLog.compact` drops whole old segments after a snapshot). The log
validates its own invariants on append: indices contiguous, epochs never decreasing. It does not know what a
committed entry is: never truncating a committed entry is the replication core's rule; the log only refuses
to truncate below its first index.

On-disk format (version 1; every integer little-endian)
-------------------------------------------------------
``DATA_DIR/log/<first index, 20 digits>.seg``, one file per segment, in index order. Each file starts with a
header, then records back to back:

* header, 64 bytes in version 1: ``magic "TNLOG\\r\\n\\x1a"`` (8) | ``format version`` u16 | ``header
  length`` u16 (64) | ``first index`` u64 | ``epoch of entry first_index-1`` u64 | ``SQLite version length``
  u8 | ``SQLite version`` (ASCII, zero-padded to 31) | ``CRC32C of the 60 header bytes before it`` u32. The SQLite version is the one entries in this segment were
  written under: deterministic replay needs the same SQLite everywhere, so the caller compares
  :meth:`DurableLog.sqlite_version_at` with its own and refuses to apply entries written under another.
  A node that starts with another SQLite opens a new segment for what it writes (one version per segment).
* record: ``CRC32C`` u32 | ``body length`` u32 | ``epoch`` u64 | ``index`` u64 | ``kind`` u16 | ``payload``,
  where body length = 18 + len(payload) and the CRC covers the length field and the whole body (so a torn
  length, header or payload is detected alike). 26 bytes of framing per entry.

A later release reads the versions it knows and refuses any other explicitly (:class:`LogVersionError`),
never by guessing. Segments roll over at ``segment_bytes`` (default 64 MiB); one record may exceed it.

Durability and group commit
---------------------------
:meth:`DurableLog.append` writes entries to the page cache (one ``pwrite`` per call, whatever the number of
entries); :meth:`DurableLog.sync` makes *everything appended so far* durable with one ``fdatasync`` and
returns the durable last index. So N concurrent client writes cost one append and one fsync when the caller
hands them over together (:class:`node.storage.asynclog.AsyncLog` does exactly that). Creating a segment
fsyncs the previous one, the new file and the directory before any entry goes into it, so a sealed
segment is always complete on disk and only the last segment can have a torn tail.

Ordering rules the caller (the Replicator) must follow -- the order is the protocol:

1. **Hard state before messages.** Save the hard state (:mod:`node.storage.hardstate`) and wait for it to
   return before sending any message of a new epoch, any promise/vote, or any answer that depends on it.
2. **Follower acks after sync.** A follower acknowledges entries up to index N only after a ``sync()`` that
   returned >= N has returned. An entry appended but not synced may be lost in a crash and must never be
   counted toward a majority.
3. **Leader counts itself after sync.** A leader may send entries to followers before its own sync (the read
   path serves appended entries from the page cache), but counts its own copy toward the majority only once
   its own ``sync()`` returned >= N. Clients are answered only after commit (and apply).
4. **Truncate before appending the replacement.** ``truncate_after(i)`` is durable when it returns; a
   follower appends the leader's entries after it, then syncs, then acks. It never truncates below the
   commit index (the core's rule; the log cannot know).
5. **Compact after the snapshot is durable.** ``compact(i)`` only after a snapshot covering ``i`` is durable.
6. **Reset after the snapshot is installed.** ``reset(i, e)`` only after the database holds a snapshot of
   index ``i`` (epoch ``e``); then re-append the entries above ``i`` the caller keeps.

Compaction and reset (what a crash leaves)
------------------------------------------
:meth:`DurableLog.compact` unlinks whole sealed segments, oldest first, then fsyncs the directory: a crash at
any point leaves the old log or a contiguous suffix of it (the first index moved forward), which opens as
an ordinary log.

:meth:`DurableLog.reset` (after a snapshot install on a follower) empties the log so that it continues after
the snapshot: ``first_index = base_index + 1``, ``epoch_at(base_index) = base_epoch``. It unlinks every
segment oldest first, fsyncing the directory after each unlink (so even a power cut cannot leave a gap:
what remains is always a suffix), then creates the new empty segment by writing its header to a temp file,
fsyncing it and renaming it to ``<base_index + 1>.seg`` (directory fsynced): the new segment appears whole
or not at all. A crash at any point therefore opens as exactly one of:

* the old log (nothing unlinked yet);
* a contiguous suffix of the old log (some oldest segments unlinked);
* an empty log (every segment unlinked, the new one not yet renamed): :meth:`DurableLog.open` creates a
  segment at its ``first_index`` argument with epoch 0 below it;
* the new empty log (``first_index = base_index + 1``, epoch ``base_epoch`` below it).

At start the caller checks the log against the installed snapshot (index ``i``, epoch ``e``, the database's
applied index): if the log holds ``i`` with epoch ``e`` (``epoch_at(i) == e``, which includes the new empty
log), it is consistent with the snapshot and the entries after ``i`` are an ordinary unacknowledged suffix;
otherwise (an empty log, a suffix starting above ``i + 1``, another epoch at ``i``) it calls ``reset(i, e)``
again. A leftover temp segment (``*.seg.tmp``) is never read and is removed by the next open.

Recovery at open
----------------
Every segment is read once, sequentially, one at a time, and every checksum, index and epoch verified (about
as fast as the disk reads: the same order as SQLite's quick_check at start; memory is one segment). The
epochs kept in memory (for :meth:`DurableLog.epoch_at`) therefore come only from verified records, and
:meth:`DurableLog.read` verifies checksums again on every read. A bad record in a sealed segment is damage.
At the first bad record in the last segment:

* **torn tail** (silently cut, then truncated on disk): the file ends inside that record's framing (a
  partial final write), or everything from it to the end of the file is zero bytes (blocks allocated but
  never written before a power cut);
* **corruption** (:class:`LogCorrupt` with the segment and byte offset, nothing cut): anything else -- a
  complete record with a bad checksum or an unexpected index/epoch, an impossible length, or a valid record
  found *after* the bad one. A valid-looking region after a bad record is never dropped silently: the caller
  quarantines the log and resyncs from the leader.

Disk full
---------
A ``pwrite`` that fails (ENOSPC or otherwise) is undone with ``ftruncate`` to the previous end, and raises
:class:`LogDiskFull` (or :class:`LogIOError`): nothing of that append exists afterwards. A failed
``fdatasync`` cannot be retried safely (Linux may drop the dirty pages and report success the next time), so
the unsynced suffix is cut (``ftruncate`` to the last durable offset, then ``fdatasync``) and forgotten:
:meth:`last` goes back to the durable index, the caller answers its waiters with the error and may append
again later. If even that fails, the log refuses every call (:class:`LogFailed`) until it is reopened, and
reopening runs recovery. ``reserve_bytes`` makes :meth:`append` refuse beforehand (:class:`LogSpaceLow`)
while the filesystem has less free space than the batch plus the reserve; :meth:`free_bytes` reports it.

Threading
---------
All of this is blocking I/O. A :class:`DurableLog` is confined to the thread that opened it (every public
method checks and raises ``RuntimeError`` otherwise): run it on one dedicated thread, never on the event
loop. :class:`node.storage.asynclog.AsyncLog` is that thread plus a batching queue.
"""

from __future__ import annotations

import bisect
import errno
import os
import struct
import threading
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from node.errors import RefusedToRun
from node.storage.durable import (
    TEMP_SUFFIX,
    crash_point,
    crc32c,
    crc32c_extend,
    free_bytes,
    fsync_dir,
    is_disk_full,
    write_all,
)

LOG_DIR_NAME = "log"
SEGMENT_SUFFIX = ".seg"
SEGMENT_MAGIC = b"TNLOG\r\n\x1a"
FORMAT_VERSION = 1
READABLE_FORMAT_VERSIONS = frozenset({FORMAT_VERSION})
DEFAULT_SEGMENT_BYTES = 64 << 20
# The format's limit on one payload (recovery treats a larger declared length as damage); appends are bounded
# by the smaller ``max_payload_bytes`` a DurableLog is opened with.
FORMAT_MAX_PAYLOAD_BYTES = 256 << 20
DEFAULT_MAX_PAYLOAD_BYTES = 64 << 20
MAX_KIND = 0xFFFF
MAX_U63 = (1 << 63) - 1

# magic | version | header length | first index | epoch before first index | SQLite version length
_SEG_HEAD = struct.Struct("<8sHHQQB")
_CRC = struct.Struct("<I")
_REC_PREFIX = struct.Struct("<II")  # crc32c, body length
_REC_BODY_HEAD = struct.Struct("<QQH")  # epoch, index, kind
_REC_HEAD = struct.Struct("<IQQH")  # body length, epoch, index, kind: what the CRC covers before the payload
_INDEX = struct.Struct("<Q")
RECORD_OVERHEAD_BYTES = _REC_PREFIX.size + _REC_BODY_HEAD.size  # 26
_MIN_BODY = _REC_BODY_HEAD.size
# Version 1 headers have one fixed size, so a header cut short by a crash is recognisable by its length alone
# (a damaged length field cannot make a full header look torn).
SEGMENT_HEADER_BYTES = 64
MAX_SQLITE_VERSION_BYTES = SEGMENT_HEADER_BYTES - _SEG_HEAD.size - _CRC.size  # 31
# Headers of any version declare their length; a reader refuses anything outside this range.
_MAX_HEADER_BYTES = 4096
# Recovery probes for a valid record hidden after a bad one; past this many candidates it calls it damage.
_PROBE_CANDIDATES = 10_000


@dataclass(frozen=True, slots=True)
class LogEntry:
    epoch: int
    index: int
    kind: int
    payload: bytes

    @property
    def size_bytes(self) -> int:
        """Bytes the entry takes on disk (framing included); what :meth:`DurableLog.read` budgets."""
        return RECORD_OVERHEAD_BYTES + len(self.payload)


@dataclass(frozen=True, slots=True)
class SegmentInfo:
    path: Path
    format_version: int
    sqlite_version: str
    first_index: int
    last_index: int  # first_index - 1 when empty
    size_bytes: int


class LogError(Exception):
    """Base of every error the log raises on purpose."""


class LogCorrupt(LogError):
    """A record that is not a torn tail failed validation: quarantine the log and resync; nothing was cut."""

    def __init__(self, segment: Path, offset: int, reason: str) -> None:
        super().__init__(f"log segment {segment} is damaged at byte {offset}: {reason}")
        self.segment = segment
        self.offset = offset
        self.reason = reason


class LogVersionError(LogError, RefusedToRun):
    """A segment was written in a format version this release does not read (refused, never guessed); a
    restart in the same process would only refuse it again (node.runtime.restart)."""


class LogDiskFull(LogError):
    """The disk is full: nothing of the failed append or sync is stored; retry once space is freed."""


class LogSpaceLow(LogDiskFull):
    """Refused beforehand: the append would leave less free space than the configured reserve."""


class LogIOError(LogError):
    """An I/O error other than a full disk; the failed append or unsynced suffix was undone."""


class LogFailed(LogError):
    """Undoing a failed write failed too: the log's state on disk is unknown until it is reopened."""


class LogCompacted(LogError):
    """The requested index is below the first index (compacted into a snapshot): send the snapshot instead."""


@dataclass(slots=True)
class _Segment:
    path: Path
    fd: int | None  # open (read-write) only for the last segment; sealed ones are opened per read
    format_version: int
    sqlite_version: str
    first_index: int
    prev_epoch: int
    header_bytes: int
    offsets: array  # byte offset of each record, entry first_index + i at offsets[i]
    end: int  # offset just past the last record: where the next one goes
    # (first index, epoch) where the epoch changes inside this segment; filled at open, then merged into the log
    open_runs: list[tuple[int, int]] | None = None

    @property
    def count(self) -> int:
        return len(self.offsets)

    @property
    def last_index(self) -> int:
        return self.first_index + len(self.offsets) - 1

    def close(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)

    def writable_fd(self) -> int:
        if self.fd is None:
            self.fd = os.open(self.path, os.O_RDWR)
        return self.fd

    def offset_of(self, index: int) -> int:
        """Offset of entry ``index``, or ``end`` for the index just after the last."""
        i = index - self.first_index
        return self.offsets[i] if i < len(self.offsets) else self.end


def segment_name(first_index: int) -> str:
    return f"{first_index:020d}{SEGMENT_SUFFIX}"


def encode_segment_header(first_index: int, prev_epoch: int, sqlite_version: str) -> bytes:
    version = sqlite_version.encode("ascii")
    if len(version) > MAX_SQLITE_VERSION_BYTES:
        raise ValueError(f"SQLite version string longer than {MAX_SQLITE_VERSION_BYTES} bytes")
    head = _SEG_HEAD.pack(
        SEGMENT_MAGIC, FORMAT_VERSION, SEGMENT_HEADER_BYTES, first_index, prev_epoch, len(version)
    )
    head += version.ljust(MAX_SQLITE_VERSION_BYTES, b"\0")
    return head + _CRC.pack(crc32c(head))


def encode_records(entries: Sequence[LogEntry]) -> bytes:
    """The entries' records, one after another (the format is in the module docstring), built with one struct
    call and two checksum calls per entry and no intermediate record: every entry an append writes goes
    through it. The payloads must be ``bytes`` (what :meth:`DurableLog._validate` checks before any write)."""
    parts: list[bytes] = []
    add = parts.extend
    pack_head, pack_crc, extend = _REC_HEAD.pack, _CRC.pack, crc32c_extend
    for e in entries:
        payload = e.payload
        head = pack_head(_MIN_BODY + len(payload), e.epoch, e.index, e.kind)
        add((pack_crc(extend(extend(0, head), payload)), head, payload))
    return b"".join(parts)


def default_sqlite_version() -> str:
    """The SQLite library version this process would apply entries with."""
    import apsw

    return apsw.sqlite_lib_version()


class _Header:
    """A parsed segment header (or the reason it is unusable)."""

    __slots__ = ("version", "length", "first_index", "prev_epoch", "sqlite_version")

    def __init__(self, version: int, length: int, first_index: int, prev_epoch: int, sqlite_version: str):
        self.version = version
        self.length = length
        self.first_index = first_index
        self.prev_epoch = prev_epoch
        self.sqlite_version = sqlite_version


def _parse_header(data: bytes) -> _Header | str:
    if len(data) < _SEG_HEAD.size:
        return "shorter than a segment header"
    magic, version, length, first_index, prev_epoch, vlen = _SEG_HEAD.unpack_from(data)
    if magic != SEGMENT_MAGIC:
        return f"not a log segment (magic {magic!r})"
    if not _SEG_HEAD.size + vlen + _CRC.size <= length <= _MAX_HEADER_BYTES:
        return f"header length {length} is impossible (SQLite version length {vlen})"
    if len(data) < length:
        return "shorter than its header"
    (checksum,) = _CRC.unpack_from(data, length - _CRC.size)
    if crc32c(data[: length - _CRC.size]) != checksum:
        return "header checksum mismatch"
    try:
        sqlite_version = data[_SEG_HEAD.size : _SEG_HEAD.size + vlen].decode("ascii")
    except UnicodeDecodeError:
        return "SQLite version is not ASCII"
    return _Header(version, length, first_index, prev_epoch, sqlite_version)


def _record_at(data: bytes, off: int, expected_index: int, min_epoch: int) -> LogEntry | str:
    """The record at ``off`` if it is complete, checksummed and the expected next entry; else why not."""
    if len(data) - off < RECORD_OVERHEAD_BYTES:
        return "incomplete"
    checksum, length = _REC_PREFIX.unpack_from(data, off)
    if length < _MIN_BODY or length > _MIN_BODY + FORMAT_MAX_PAYLOAD_BYTES:
        return f"impossible body length {length}"
    end = off + _REC_PREFIX.size + length
    if end > len(data):
        return "incomplete"
    if crc32c(data[off + 4 : end]) != checksum:
        return "checksum mismatch"
    epoch, index, kind = _REC_BODY_HEAD.unpack_from(data, off + _REC_PREFIX.size)
    if index != expected_index:
        return f"index {index} where {expected_index} was expected"
    if epoch < min_epoch:
        return f"epoch {epoch} below the previous entry's {min_epoch}"
    return LogEntry(epoch, index, kind, data[off + RECORD_OVERHEAD_BYTES : end])


def _valid_record_after(data: bytes, start: int, first_index: int) -> int | None:
    """Offset of a checksummed record after ``start`` whose index is ``first_index`` or the next one.

    Finds records hidden behind a damaged length field: the entries after a bad one carry the next indices,
    so the search looks for those 8-byte index values (C-speed ``bytes.find``) and checks each hit's checksum.
    """
    checked = 0
    for index in (first_index, first_index + 1):
        needle = _INDEX.pack(index)
        # index field sits 16 bytes into a record
        pos = data.find(needle, start + 1 + 16)
        while pos != -1:
            checked += 1
            if checked > _PROBE_CANDIDATES:
                return pos - 16
            candidate = pos - 16
            if isinstance(_record_at(data, candidate, index, 0), LogEntry):
                return candidate
            pos = data.find(needle, pos + 1)
    return None


def _classify_bad_tail(data: bytes, off: int, expected_index: int, min_epoch: int) -> str | None:
    """None if the bad record at ``off`` is a torn tail to cut; else why it is corruption."""
    tail_len = len(data) - off
    if data.count(0, off) == tail_len:
        return None  # zero-filled blocks after a crash: nothing was ever written there
    if tail_len < _REC_PREFIX.size:
        return None  # the file ends inside the record's checksum/length
    _, length = _REC_PREFIX.unpack_from(data, off)
    if length < _MIN_BODY or length > _MIN_BODY + FORMAT_MAX_PAYLOAD_BYTES:
        return f"impossible body length {length}"
    if off + _REC_PREFIX.size + length <= len(data):
        reason = _record_at(data, off, expected_index, min_epoch)
        return reason if isinstance(reason, str) else "unexpected record"
    # The file ends inside this record: a partial final write, unless its visible fields disagree or a valid
    # record follows (a damaged length field in the middle would look the same otherwise).
    if tail_len >= RECORD_OVERHEAD_BYTES:
        epoch, index, _ = _REC_BODY_HEAD.unpack_from(data, off + _REC_PREFIX.size)
        if index != expected_index or epoch < min_epoch:
            return f"partial record claims index {index} epoch {epoch}; expected index {expected_index}"
    hidden = _valid_record_after(data, off, expected_index + 1)
    if hidden is not None:
        return f"bad record followed by a valid one at byte {hidden}"
    return None


class DurableLog:
    """The log of one replica. Thread-confined: every call from the thread that opened it (see module doc)."""

    def __init__(
        self,
        directory: Path,
        segments: list[_Segment],
        *,
        sqlite_version: str,
        segment_bytes: int,
        max_payload_bytes: int,
        reserve_bytes: int,
    ) -> None:
        self.directory = directory
        self.sqlite_version = sqlite_version
        self.segment_bytes = segment_bytes
        self.max_payload_bytes = max_payload_bytes
        self.reserve_bytes = reserve_bytes
        self._owner = threading.get_ident()
        self._segments = segments
        self._firsts = [s.first_index for s in segments]
        # (first index of a run of entries with one epoch, that epoch), ascending.
        self._runs: list[tuple[int, int]] = []
        self._last_index = segments[0].first_index - 1
        self._last_epoch = segments[0].prev_epoch
        self._failed: str | None = None
        self.stats = {"appends": 0, "entries": 0, "syncs": 0, "bytes": 0}

    # ---------------------------------------------------------------- open and recovery

    @classmethod
    def open(
        cls,
        directory: Path,
        *,
        sqlite_version: str | None = None,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        reserve_bytes: int = 0,
        first_index: int = 1,
    ) -> DurableLog:
        """Open (creating if needed) the log in ``directory``, recovering from a crash. Blocking.

        Raises :class:`LogCorrupt` (quarantine and resync), :class:`LogVersionError` (a newer release wrote
        it), ``OSError`` for I/O errors. ``first_index`` only matters for a new, empty log.
        """
        if not 0 < max_payload_bytes <= FORMAT_MAX_PAYLOAD_BYTES:
            raise ValueError(f"max_payload_bytes must be in (0, {FORMAT_MAX_PAYLOAD_BYTES}]")
        if segment_bytes < 64 or reserve_bytes < 0 or first_index < 1:
            raise ValueError("segment_bytes too small, reserve_bytes negative or first_index below 1")
        version = default_sqlite_version() if sqlite_version is None else sqlite_version
        directory.mkdir(parents=True, exist_ok=True)
        _remove_temp_segments(directory)
        names = sorted(p for p in directory.iterdir() if p.name.endswith(SEGMENT_SUFFIX))
        segments: list[_Segment] = []
        try:
            for path in names:
                stem = path.name[: -len(SEGMENT_SUFFIX)]
                if len(stem) != 20 or not stem.isdigit():
                    raise LogCorrupt(path, 0, "segment file name is not a 20-digit first index")
            log_first = int(names[0].name[:20]) if names else first_index
            if not names:
                segments.append(_create_segment(directory, first_index, 0, version))
            else:
                for path in names[:-1]:
                    sealed = _open_segment(path, segments[-1] if segments else None, last=False)
                    assert sealed is not None
                    segments.append(sealed)
                last = _open_segment(names[-1], segments[-1] if segments else None, last=True)
                if last is None:  # a segment torn while being created, never used: remove it
                    names[-1].unlink()
                    fsync_dir(directory)
                    if not segments:
                        segments.append(_create_segment(directory, log_first, 0, version))
                    else:
                        tail = segments.pop()
                        tail.close()
                        reopened = _open_segment(tail.path, segments[-1] if segments else None, last=True)
                        if reopened is None:
                            raise LogCorrupt(tail.path, 0, "segment header torn, yet a later segment exists")
                        segments.append(reopened)
                else:
                    segments.append(last)
            fsync_dir(directory)  # a segment created just before a crash is durable before it is relied on
        except BaseException:
            for seg in segments:
                seg.close()
            raise
        log = cls(
            directory,
            segments,
            sqlite_version=version,
            segment_bytes=segment_bytes,
            max_payload_bytes=max_payload_bytes,
            reserve_bytes=reserve_bytes,
        )
        log._rebuild_epochs()
        return log

    def _rebuild_epochs(self) -> None:
        """Merge the epoch runs each segment found while it was opened."""
        runs: list[tuple[int, int]] = []
        for seg in self._segments:
            for start, epoch in seg.open_runs or ():
                if not runs or runs[-1][1] != epoch:
                    runs.append((start, epoch))
            seg.open_runs = None
        self._runs = runs
        self._firsts = [s.first_index for s in self._segments]
        last = self._segments[-1]
        self._last_index = last.last_index
        self._last_epoch = runs[-1][1] if runs else self._segments[0].prev_epoch
        self._synced_index = self._last_index
        self._synced_end = last.end

    # ---------------------------------------------------------------- queries

    @property
    def first_index(self) -> int:
        return self._segments[0].first_index

    @property
    def failure(self) -> str | None:
        """Why the log refuses every call until reopened (None while usable)."""
        return self._failed

    @property
    def synced_index(self) -> int:
        """Highest index that is durable (a crash cannot lose it)."""
        return self._synced_index

    def last(self) -> tuple[int, int]:
        """(epoch, index) of the last appended entry; (epoch before first, first_index - 1) when empty."""
        self._check_thread()
        return self._last_epoch, self._last_index

    def epoch_at(self, index: int) -> int:
        """Epoch of entry ``index`` (``first_index - 1`` included: the epoch the log starts after)."""
        self._check_thread()
        if index == self.first_index - 1:
            return self._segments[0].prev_epoch
        self._check_range(index)
        i = bisect.bisect_right(self._runs, (index, MAX_U63 + 1)) - 1
        return self._runs[i][1]

    term_at = epoch_at

    def sqlite_version_at(self, index: int) -> str:
        """SQLite version entry ``index`` was written under: refuse to apply it under another."""
        self._check_thread()
        self._check_range(index)
        return self._segments[self._segment_for(index)].sqlite_version

    def segments(self) -> list[SegmentInfo]:
        self._check_thread()
        return [
            SegmentInfo(s.path, s.format_version, s.sqlite_version, s.first_index, s.last_index, s.end)
            for s in self._segments
        ]

    def free_bytes(self) -> int:
        """Free bytes on the log's filesystem, so the caller can refuse writes before the disk fills."""
        self._check_thread()
        return free_bytes(self.directory)

    def read(self, from_index: int, max_bytes: int) -> list[LogEntry]:
        """Entries from ``from_index`` on, at most ``max_bytes`` of records (framing included) -- but always at
        least one entry if any exists, so one large entry cannot stall a follower's catch-up.

        Returns appended entries whether synced or not (see the ordering rules). Every checksum is verified;
        raises :class:`LogCorrupt` with the offset, :class:`LogCompacted` below the first index.
        """
        self._check_usable()
        if from_index < self.first_index:
            raise LogCompacted(f"index {from_index} is compacted; the log starts at {self.first_index}")
        out: list[LogEntry] = []
        budget = max_bytes
        index = from_index
        s = self._segment_for(index) if index <= self._last_index else len(self._segments)
        # Each round reads from one segment and moves to the next or stops: at most len(segments) rounds.
        while s < len(self._segments) and index <= self._last_index:
            seg = self._segments[s]
            lo = index - seg.first_index
            if lo >= seg.count:
                s += 1
                continue
            start = seg.offsets[lo]
            limit = start + budget
            # Records lo..lo+n-1 end at offsets[lo+1..lo+n] (the last one at seg.end): count those that fit.
            n = bisect.bisect_right(seg.offsets, limit, lo=lo + 1) - (lo + 1)
            if lo + 1 + n == seg.count and seg.end <= limit:
                n += 1
            if n == 0:
                if out:
                    break
                n = 1  # always at least one entry, however large
            stop = seg.offsets[lo + n] if lo + n < seg.count else seg.end
            data = _pread(seg, stop - start, start)
            off = 0
            for _ in range(n):
                got = _record_at(data, off, index, 0)
                if isinstance(got, str):
                    raise LogCorrupt(seg.path, start + off, got)
                out.append(got)
                off += got.size_bytes
                index += 1
            budget -= stop - start
            if lo + n < seg.count or budget <= 0:
                break
            s += 1
        return out

    # ---------------------------------------------------------------- writes

    def append(self, entries: Sequence[LogEntry]) -> int:
        """Write ``entries`` (the next indices, epochs not decreasing) with one pwrite; not yet durable.

        Returns the new last index. Invalid entries raise ValueError and nothing is written; a failed write
        raises :class:`LogDiskFull`/:class:`LogIOError` and nothing of it remains.
        """
        self._check_usable()
        self._validate(entries, self._last_index, self._last_epoch)
        self._write(list(entries))
        return self._last_index

    def append_groups(self, groups: Sequence[Sequence[LogEntry]]) -> list[Exception | None]:
        """Append several callers' batches in one pwrite: each group is validated on its own (ValueError in
        its slot, the others still written), in order. Write errors raise for all."""
        self._check_usable()
        results: list[Exception | None] = []
        accepted: list[LogEntry] = []
        last_index, last_epoch = self._last_index, self._last_epoch
        for group in groups:
            try:
                self._validate(group, last_index, last_epoch)
            except ValueError as exc:
                results.append(exc)
                continue
            results.append(None)
            accepted.extend(group)
            if group:
                last_index, last_epoch = group[-1].index, group[-1].epoch
        self._write(accepted)
        return results

    def sync(self) -> int:
        """Make everything appended so far durable with one fdatasync; return the durable last index.

        On failure the unsynced suffix is cut and forgotten (see module doc) and the error raised: the
        caller must fail every waiter of those entries, never acknowledge them.
        """
        self._check_usable()
        if self._synced_index == self._last_index:
            return self._synced_index
        seg = self._segments[-1]
        try:
            os.fdatasync(seg.writable_fd())
        except OSError as exc:
            self._undo_unsynced(exc)
        self._synced_index = self._last_index
        self._synced_end = seg.end
        self.stats["syncs"] += 1
        return self._synced_index

    def truncate_after(self, index: int) -> None:
        """Drop every entry after ``index`` (a divergent, uncommitted suffix); durable when it returns."""
        self._check_usable()
        if index >= self._last_index:
            return
        if index < self.first_index - 1:
            raise LogCompacted(f"cannot truncate after {index}: the log starts at {self.first_index}")
        try:
            self._cut_after(index)
        except OSError as exc:
            self._failed = f"truncate failed: {exc}"
            raise LogFailed(self._failed) from exc

    def compact(self, upto_index: int) -> int:
        """Drop whole segments whose entries are all <= ``upto_index`` (never the last segment); returns the
        new first index. Call only once a snapshot covering ``upto_index`` is durable."""
        self._check_usable()
        dropped = False
        try:
            # Oldest first: a crash leaves a contiguous suffix of the log.
            while len(self._segments) > 1 and self._segments[0].last_index <= upto_index:
                seg = self._segments.pop(0)
                seg.close()
                seg.path.unlink()
                dropped = True
            if dropped:
                fsync_dir(self.directory)
        except OSError as exc:
            self._failed = f"compaction failed: {exc}"
            raise LogFailed(self._failed) from exc
        if dropped:
            first = self.first_index
            if first > self._last_index:
                self._runs = []
            else:
                keep = bisect.bisect_right(self._runs, (first, MAX_U63 + 1)) - 1
                self._runs = [(max(start, first), epoch) for start, epoch in self._runs[keep:]]
            self._firsts = [s.first_index for s in self._segments]
        return self.first_index

    def reset(self, base_index: int, base_epoch: int) -> None:
        """Empty the log so that it continues right after a snapshot of ``base_index`` (epoch ``base_epoch``):
        afterwards ``first_index == base_index + 1`` and ``last() == (base_epoch, base_index)``.

        For a follower that installed a snapshot: entries at or below it are in the database, and the old
        entries above it are dropped (the caller re-appends those it keeps). Durable when it returns; what a
        crash part-way leaves is in the module doc. An I/O error leaves the log failed (reopen it).
        """
        self._check_usable()
        if not 0 <= base_index < MAX_U63 or not 0 <= base_epoch <= MAX_U63:
            raise ValueError(f"reset to index {base_index} epoch {base_epoch}: out of range")
        try:
            # Oldest first, each unlink durable before the next: what a crash leaves is always a suffix.
            while self._segments:
                seg = self._segments[0]
                seg.close()
                seg.path.unlink()
                del self._segments[0]
                fsync_dir(self.directory)
                crash_point("log-reset-unlinked")
            fresh = _create_segment_atomically(
                self.directory, base_index + 1, base_epoch, self.sqlite_version
            )
        except OSError as exc:
            self._failed = f"reset failed: {exc}"
            raise LogFailed(self._failed) from exc
        self._segments = [fresh]
        self._firsts = [fresh.first_index]
        self._runs = []
        self._last_index = base_index
        self._last_epoch = base_epoch
        self._synced_index = base_index
        self._synced_end = fresh.end

    def close(self) -> None:
        for seg in self._segments:
            try:
                seg.close()
            except OSError:
                pass
        self._segments = []
        self._failed = "closed"

    # ---------------------------------------------------------------- internals

    def _check_thread(self) -> None:
        if threading.get_ident() != self._owner:
            raise RuntimeError("DurableLog is confined to the thread that opened it")

    def _check_usable(self) -> None:
        self._check_thread()
        if self._failed is not None:
            raise LogFailed(f"the log must be reopened: {self._failed}")

    def _check_range(self, index: int) -> None:
        if index < self.first_index:
            raise LogCompacted(f"index {index} is compacted; the log starts at {self.first_index}")
        if index > self._last_index:
            raise IndexError(f"index {index} is beyond the last index {self._last_index}")

    def _segment_for(self, index: int) -> int:
        return bisect.bisect_right(self._firsts, index) - 1

    def _validate(self, entries: Sequence[LogEntry], last_index: int, last_epoch: int) -> None:
        max_payload = self.max_payload_bytes
        for e in entries:
            index, epoch, kind, payload = e.index, e.epoch, e.kind, e.payload
            if not isinstance(index, int) or index != last_index + 1:
                raise ValueError(f"entry index {index} does not follow {last_index}")
            if not isinstance(epoch, int) or not last_epoch <= epoch <= MAX_U63:
                raise ValueError(f"entry {index} epoch {epoch} is below {last_epoch} or out of range")
            if not isinstance(kind, int) or not 0 <= kind <= MAX_KIND:
                raise ValueError(f"entry {index} kind {kind} is not in [0, {MAX_KIND}]")
            if not isinstance(payload, bytes) or len(payload) > max_payload:
                raise ValueError(f"entry {index} payload is not bytes of at most {max_payload}")
            last_index, last_epoch = index, epoch

    def _write(self, entries: list[LogEntry]) -> None:
        if not entries:
            return
        data = encode_records(entries)
        if self.reserve_bytes and free_bytes(self.directory) < len(data) + self.reserve_bytes:
            raise LogSpaceLow(
                f"appending {len(data)} bytes would leave less than the {self.reserve_bytes}-byte reserve free"
            )
        seg = self._segments[-1]
        if seg.sqlite_version != self.sqlite_version or (seg.count and seg.end >= self.segment_bytes):
            self._roll()
            seg = self._segments[-1]
        try:
            write_all(seg.writable_fd(), data, seg.end)
        except OSError as exc:
            try:
                os.ftruncate(seg.writable_fd(), seg.end)
            except OSError as undo:
                self._failed = f"could not undo a failed append: {undo}"
                raise LogFailed(self._failed) from exc
            raise _write_error(exc, "append") from exc
        off = seg.end
        offsets, runs = seg.offsets, self._runs
        run_epoch = runs[-1][1] if runs else None
        for e in entries:
            offsets.append(off)
            off += RECORD_OVERHEAD_BYTES + len(e.payload)
            if e.epoch != run_epoch:
                run_epoch = e.epoch
                runs.append((e.index, run_epoch))
        seg.end = off
        self._last_index = entries[-1].index
        self._last_epoch = entries[-1].epoch
        self.stats["appends"] += 1
        self.stats["entries"] += len(entries)
        self.stats["bytes"] += len(data)

    def _roll(self) -> None:
        """Start a new segment: seal (fsync) the current one first, so only the last segment can be torn."""
        seg = self._segments[-1]
        if seg.count == 0:
            # An empty segment written under another SQLite version: replace it in place.
            fresh_first, prev_epoch = seg.first_index, seg.prev_epoch
            seg.close()
            seg.path.unlink()
            self._segments.pop()
        else:
            self.sync()
            fresh_first, prev_epoch = self._last_index + 1, self._last_epoch
        try:
            fresh = _create_segment(self.directory, fresh_first, prev_epoch, self.sqlite_version)
        except OSError as exc:
            if seg.count == 0:
                self._failed = f"could not re-create the last segment: {exc}"
                raise LogFailed(self._failed) from exc
            raise _write_error(exc, "new segment") from exc
        if seg.count:
            seg.close()  # sealed: read through a short-lived descriptor from now on
        self._segments.append(fresh)
        self._firsts = [s.first_index for s in self._segments]
        self._synced_end = fresh.end

    def _undo_unsynced(self, exc: OSError) -> None:
        seg = self._segments[-1]
        try:
            os.ftruncate(seg.writable_fd(), self._synced_end)
            os.fdatasync(seg.writable_fd())
        except OSError as undo:
            self._failed = f"could not cut the unsynced suffix after a failed fsync: {undo}"
            raise LogFailed(self._failed) from exc
        self._forget_after(self._synced_index)
        raise _write_error(exc, "sync") from exc

    def _forget_after(self, index: int) -> None:
        """In-memory side of cutting every entry after ``index`` inside the last segment."""
        seg = self._segments[-1]
        keep = max(0, index - seg.first_index + 1)
        seg.end = seg.offset_of(seg.first_index + keep)
        del seg.offsets[keep:]
        while self._runs and self._runs[-1][0] > index:
            self._runs.pop()
        self._last_index = index
        self._last_epoch = self._runs[-1][1] if self._runs else self._segments[0].prev_epoch

    def _cut_after(self, index: int) -> None:
        removed = False
        # Whole segments after ``index``, newest first: a crash part-way leaves a contiguous prefix (a longer
        # log, truncated again on retry). The first segment stays even if emptied: it holds the first index.
        while len(self._segments) > 1 and self._segments[-1].first_index > index:
            seg = self._segments.pop()
            seg.close()
            seg.path.unlink()
            removed = True
        seg = self._segments[-1]
        if removed:
            fsync_dir(self.directory)
        self._firsts = [s.first_index for s in self._segments]
        cut = seg.offset_of(index + 1)
        os.ftruncate(seg.writable_fd(), cut)
        os.fdatasync(seg.writable_fd())
        self._forget_after(index)
        # fdatasync flushed the whole file and earlier segments are sealed: everything left is durable.
        self._synced_index = index
        self._synced_end = seg.end


def _pread(seg: _Segment, size: int, offset: int) -> bytes:
    if seg.fd is not None:
        return os.pread(seg.fd, size, offset)
    fd = os.open(seg.path, os.O_RDONLY)
    try:
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


def _write_error(exc: OSError, what: str) -> LogError:
    if is_disk_full(exc):
        return LogDiskFull(f"disk full during {what}: nothing of it is stored; retry once space is freed")
    return LogIOError(f"I/O error during {what} ({errno.errorcode.get(exc.errno or 0, exc.errno)}): undone")


def _create_segment(directory: Path, first_index: int, prev_epoch: int, sqlite_version: str) -> _Segment:
    """Create a segment with its header durable (file and directory fsynced) before any entry goes in."""
    path = directory / segment_name(first_index)
    header = encode_segment_header(first_index, prev_epoch, sqlite_version)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        write_all(fd, header, 0)
        os.fdatasync(fd)
        fsync_dir(directory)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    return _empty_segment(path, fd, header, sqlite_version, first_index, prev_epoch)


def _empty_segment(
    path: Path, fd: int, header: bytes, sqlite_version: str, first_index: int, prev_epoch: int
) -> _Segment:
    """The open segment just created at ``path`` holding only its ``header``."""
    return _Segment(
        path, fd, FORMAT_VERSION, sqlite_version, first_index, prev_epoch, len(header), array("Q"), len(header)
    )


def _create_segment_atomically(
    directory: Path, first_index: int, prev_epoch: int, sqlite_version: str
) -> _Segment:
    """Create an empty segment that appears whole or not at all: header into a temp file, fsync, rename,
    directory fsync (a torn header would otherwise reopen as an empty log with the wrong epoch below it)."""
    path = directory / segment_name(first_index)
    temp = path.with_name(path.name + TEMP_SUFFIX)
    header = encode_segment_header(first_index, prev_epoch, sqlite_version)
    fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        write_all(fd, header, 0)
        os.fdatasync(fd)
        crash_point("log-reset-temp-written")
        os.replace(temp, path)
        crash_point("log-reset-renamed")
        fsync_dir(directory)
    except BaseException:
        os.close(fd)
        temp.unlink(missing_ok=True)
        raise
    return _empty_segment(path, fd, header, sqlite_version, first_index, prev_epoch)


def _remove_temp_segments(directory: Path) -> None:
    """Remove temp segments a crash inside :func:`_create_segment_atomically` left (never read)."""
    removed = False
    for temp in directory.glob(f"*{SEGMENT_SUFFIX}{TEMP_SUFFIX}"):
        temp.unlink(missing_ok=True)
        removed = True
    if removed:
        fsync_dir(directory)


def _last_epoch_of(seg: _Segment) -> int:
    return seg.open_runs[-1][1] if seg.open_runs else seg.prev_epoch


def _check_header(path: Path, header: _Header | str, previous: _Segment | None) -> _Header:
    if isinstance(header, str):
        raise LogCorrupt(path, 0, header)
    if header.version not in READABLE_FORMAT_VERSIONS:
        raise LogVersionError(
            f"{path} is log format version {header.version}; this release reads {sorted(READABLE_FORMAT_VERSIONS)}"
        )
    if header.first_index != int(path.name[:20]):
        raise LogCorrupt(path, 0, f"header first index {header.first_index} differs from the file name")
    if previous is not None and header.first_index != previous.last_index + 1:
        raise LogCorrupt(
            path, 0, f"starts at {header.first_index}, after a segment ending at {previous.last_index}"
        )
    if previous is not None and header.prev_epoch != _last_epoch_of(previous):
        raise LogCorrupt(path, 0, f"epoch before it {header.prev_epoch} is not the previous segment's last")
    return header


def _header_torn(data: bytes) -> bool:
    """True if ``data`` is what a crash while creating a segment can leave: all zeros, or a prefix of a
    header shorter than the fixed header size. (The header is fsynced before any entry goes in, so such a
    file holds no entry.) A full-length header with a bad checksum is damage, not a torn write."""
    if data.count(0) == len(data):
        return True
    return len(data) < SEGMENT_HEADER_BYTES and data[:8] == SEGMENT_MAGIC[: len(data[:8])]


def _open_segment(path: Path, previous: _Segment | None, *, last: bool) -> _Segment | None:
    """Open a segment with every checksum verified (read whole: at most ``segment_bytes`` plus one record).

    A sealed segment (one with a successor) was fsynced before its successor existed, so any bad record in
    it is damage. In the last segment a torn tail is cut (see the module doc); None means its header itself
    is torn (created, never used): the caller removes the file.
    """
    data = path.read_bytes()
    parsed = _parse_header(data)
    if last and isinstance(parsed, str) and _header_torn(data):
        return None
    header = _check_header(path, parsed, previous)
    offsets = array("Q")
    runs: list[tuple[int, int]] = []
    off = header.length
    index = header.first_index
    epoch = header.prev_epoch
    size = len(data)
    unpack_prefix, unpack_body = _REC_PREFIX.unpack_from, _REC_BODY_HEAD.unpack_from
    max_body = _MIN_BODY + FORMAT_MAX_PAYLOAD_BYTES
    # Each round accepts one record or stops, bounded by the file size. The checks are _record_at's, inlined
    # without building entries: opening reads every record of the log once.
    while off < size:
        if size - off >= RECORD_OVERHEAD_BYTES:
            checksum, length = unpack_prefix(data, off)
            end = off + _REC_PREFIX.size + length
            if _MIN_BODY <= length <= max_body and end <= size and crc32c(data[off + 4 : end]) == checksum:
                rec_epoch, rec_index, _ = unpack_body(data, off + _REC_PREFIX.size)
                if rec_index == index and rec_epoch >= epoch:
                    offsets.append(off)
                    if rec_epoch != epoch or not runs:
                        runs.append((index, rec_epoch))
                    off = end
                    index += 1
                    epoch = rec_epoch
                    continue
        got = _record_at(data, off, index, epoch)
        reason = got if isinstance(got, str) else "record rejected"
        reason = _classify_bad_tail(data, off, index, epoch) if last else reason
        if reason is not None:
            raise LogCorrupt(path, off, reason)
        break
    fd: int | None = os.open(path, os.O_RDWR)
    try:
        if off < len(data):
            os.ftruncate(fd, off)  # cut the torn tail so new entries never follow garbage
        if last:
            # What a killed process appended without syncing may still sit only in the page cache: make it
            # durable now, since from here on everything recovered counts as synced (and may be acked).
            os.fdatasync(fd)
        else:
            os.close(fd)  # sealed: opened per read, so a long log does not hold a descriptor per segment
            fd = None
    except BaseException:
        if fd is not None:
            os.close(fd)
        raise
    return _Segment(
        path,
        fd,
        header.version,
        header.sqlite_version,
        header.first_index,
        header.prev_epoch,
        header.length,
        offsets,
        off,
        runs,
    )
