"""Small durable-file primitives shared by the replication log, the hard state and the node identity.

Why a module of its own: every durable file the replica keeps follows the same two rules, and getting either
wrong loses data only after a power cut, where no test sees it by accident:

* **A new or renamed file is durable only when its directory is fsynced too** (the directory entry is data
  of the directory). :func:`fsync_dir` after every create, rename and unlink that must survive a crash.
* **A small state file is replaced atomically**: write a temp file in the same directory, fsync it, rename it
  over the old one, fsync the directory (:func:`write_atomic`). A crash at any point leaves the old or the new
  file, never a mix; a leftover temp file is ignored and removed at the next write.

Checksums are CRC32C (Castagnoli): ``google-crc32c`` is a well-kept library (Google's C implementation, with
SSE4.2/ARMv8 hardware paths) and CRC32C is what iSCSI, ext4 metadata, LevelDB/RocksDB and etcd's WAL use; it
detects every burst error up to 32 bits and has a better Hamming distance than zlib's CRC-32 at log-record
sizes.

Small framed files (:func:`encode_framed` / :func:`decode_framed`) carry a magic, a format version and a
checksum, so a later release can read or refuse an old file explicitly, and a torn or foreign file is never
taken for valid state.
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Callable
from pathlib import Path

import google_crc32c

TEMP_SUFFIX = ".tmp"
# magic (8) | format version (u16) | body length (u32) | crc32c of everything before and the body (u32)
_FRAME = struct.Struct("<8sHII")
# Largest body a framed state file may declare (the hard state is a few hundred bytes; this only bounds what a
# damaged length field can make us allocate).
MAX_FRAMED_BODY_BYTES = 1 << 20
# Reads of whole files (hashing, copying) go in pieces of this size: bounded memory, few system calls.
FILE_CHUNK_BYTES = 1 << 20

# Fault injection for crash tests. A test process sets this to a callable that kills the process (SIGKILL)
# at a chosen step; production leaves it None. The steps named with :func:`crash_point` are exactly the
# points where a crash must leave a state that opens cleanly (each module's docstring says which states).
_crash_point: Callable[[str], None] | None = None


def crash_point(step: str) -> None:
    """Call the test hook, if one is set, with the name of the step about to be passed."""
    hook = _crash_point
    if hook is not None:
        hook(step)


def crc32c(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """CRC32C of ``data``, continuing from ``initial`` (so a checksum can span separate buffers).

    The C extension takes only ``bytes``; other buffers are copied once (callers pass bytes on hot paths).
    """
    return google_crc32c.extend(initial, data if isinstance(data, bytes) else bytes(data))


# The C function itself, for hot loops that pass only ``bytes`` (no wrapper frame per call).
crc32c_extend = google_crc32c.extend


def is_disk_full(exc: BaseException) -> bool:
    """True for the errors a full disk (or an exhausted quota) raises."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use on the filesystem holding ``path`` (blocking: one statvfs)."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fsync_dir(path: Path) -> None:
    """Make creates, renames and unlinks inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Make the content of the file at ``path`` durable (its directory entry needs :func:`fsync_dir`)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """pwrite every byte of ``data`` at ``offset`` (a write may be short; an error raises after a partial one)."""
    view = memoryview(data)
    done = 0
    # Each round writes at least one byte or raises, so the loop ends after at most len(data) rounds.
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a crash at any moment leaves the old or the new content.

    temp file in the same directory -> write -> fsync -> rename over ``path`` -> fsync the directory. On any
    error the temp file is removed and the old file is untouched (a full disk raises ENOSPC from here).
    """
    temp = path.with_name(path.name + TEMP_SUFFIX)
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        try:
            write_all(fd, data, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


class FramedFileError(ValueError):
    """A framed state file is torn, damaged, foreign or of a version this release cannot read."""


def encode_framed(magic: bytes, version: int, body: bytes) -> bytes:
    head = _FRAME.pack(magic, version, len(body), 0)[: _FRAME.size - 4]
    return head + struct.pack("<I", crc32c(body, crc32c(head))) + body


def decode_framed(data: bytes, magic: bytes, versions: frozenset[int]) -> tuple[int, bytes]:
    """Return (version, body) of a framed file, or raise FramedFileError saying exactly what is wrong."""
    if len(data) < _FRAME.size:
        raise FramedFileError(f"file is {len(data)} bytes, shorter than its {_FRAME.size}-byte header")
    got_magic, version, length, checksum = _FRAME.unpack_from(data)
    if got_magic != magic:
        raise FramedFileError(f"not a {magic!r} file (magic {got_magic!r})")
    if length > MAX_FRAMED_BODY_BYTES or _FRAME.size + length != len(data):
        raise FramedFileError(f"declared body of {length} bytes does not match the file size {len(data)}")
    body = data[_FRAME.size :]
    if crc32c(body, crc32c(data[: _FRAME.size - 4])) != checksum:
        raise FramedFileError("checksum mismatch")
    if version not in versions:
        raise FramedFileError(f"format version {version} is not one this release reads ({sorted(versions)})")
    return version, body
