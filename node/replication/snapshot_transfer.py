"""Snapshot transfer: a follower pulls a snapshot file from a peer over HTTP, resumably and rate-limited.

Why pull: the follower knows what it lacks (the leader named a snapshot in its replication messages), where
its half-finished download is (``incoming/<stem>.part``, see ``node.storage.snapshots``) and when to give
up; a leader pushing hundreds of MiB to each follower would have to keep that state per peer instead.

The request: ``GET /cluster/replication/snapshot/<stem>`` with

* ``X-TalentNest-Sender: <ip:port>``: who asks (the replay window is kept per sender);
* ``X-TalentNest-Peer``: a peer signature (``node.core.peerauth``) over the request path (which names the
  stem), that sender, and :func:`signed_content` of the ``Range`` header as the body digest. A GET has no
  body; signing the range binds the one header that changes what is sent. Replay-guarded in the route's
  own window like the opening of a replication stream, so each signed request is served once;
* ``Range: bytes=N-`` (optional): resume at byte N. Only that form is served; any other, or N at or past
  the end, is 416 with ``Content-Range: bytes */<size>``.

The answer (200, or 206 with ``Content-Range``) carries ``X-TalentNest-Snapshot`` (the base64url of
:meth:`SnapshotMeta.encode`), ``ETag`` (the quoted SHA-256), ``Accept-Ranges: bytes`` and
``Content-Length``; errors are JSON ``{"error", "code"}``: 401 unsigned or replayed, 404 unknown stem (and
from every node that has no snapshots), 416 bad range, 503 with ``Retry-After`` beyond
``SNAPSHOT_MAX_SENDS`` concurrent sends. A HEAD (same signature) answers the headers alone, from the meta.

Resources. The file is read in :data:`CHUNK_BYTES` pieces on a worker thread (never whole, never on the
loop) and every chunk, sent or received, first takes its bytes from one token bucket per node
(``SNAPSHOT_RATE_BYTES_S``, shared by sends and downloads): the wait, the thread hop and the socket drain
between chunks are where heartbeats on the same loop run. Each transfer holds about one chunk in memory
(plus the socket buffers), whatever the file's size.

The download (:func:`download`) appends to the part through a thread, resumes from the part's size, starts
over cleanly when the server ignores the range (200), and checks that the server's meta is the one the
leader named: a different snapshot under that stem (its meta differs, or it answers 416 to an offset below
the expected size) removes the part, whose bytes may belong to another file.
Timeouts and disconnects raise :class:`TransferInterrupted` and leave the part for the next attempt.
Verifying the SHA-256 and renaming the part into place are the store's (``SnapshotStore.finish_incoming``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import math
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import aiohttp
from aiohttp import web
from yarl import URL

from node import errors
from node.core import peerauth
from node.storage.snapshots import SnapshotMeta

PATH_PREFIX = "/cluster/replication/snapshot/"
ROUTE = PATH_PREFIX + "{stem}"
META_HEADER = "X-TalentNest-Snapshot"
SENDER_HEADER = "X-TalentNest-Sender"
CHUNK_BYTES = 1 << 20  # one read, one bucket take, one write; the most a transfer holds in memory
DEFAULT_RATE_BYTES_S = 256 << 20
BURST_S = 0.1  # seconds of its rate a node's bucket holds (see default_burst_bytes)
MIN_RATE_BYTES_S = CHUNK_BYTES  # below one chunk per second a chunk's wait would trip the stall timeouts
DEFAULT_MAX_SENDS = 2
RETRY_AFTER_S = 2
WRITE_TIMEOUT_S = 30.0  # a send whose peer reads nothing for this long is aborted
STALL_TIMEOUT_S = 30.0  # a download that receives nothing for this long is interrupted (part kept)
CONNECT_TIMEOUT_S = 10.0
PROGRESS_LOG_S = 5.0
MAX_RANGE_CHARS = 40
MAX_ERROR_BODY_BYTES = 4096
_DIGITS = frozenset("0123456789")
_STEM_DIGITS = 20

Resolve = Callable[[str], "tuple[Path, SnapshotMeta] | None"]
Opener = Callable[[Path], BinaryIO]
SignHeaders = Callable[[str, "str | None"], Mapping[str, str]]


# --- pure parts ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Bucket:
    """A token bucket that may go into debt: a take always succeeds and says how long to wait before the
    bytes may move. Debt instead of refusal makes concurrent transfers share the rate in the order they
    asked, and a take larger than the burst (a chunk above a tiny rate) still completes.

    ``rate_bytes_s`` 0 means unlimited. ``at_s`` is the time of the last take (None: never; full bucket).
    """

    rate_bytes_s: int
    burst_bytes: int
    tokens: float
    at_s: float | None = None


def default_burst_bytes(rate_bytes_s: int) -> int:
    """The burst of a node's bucket: BURST_S of its rate, at least one chunk.

    Why not one chunk: every wait of a paced transfer ends late by however long the scheduler takes to
    give the process the CPU back (milliseconds, tens of them on a busy machine). The bucket refills
    during that lateness only up to its burst, so with a burst of one chunk each late wake-up was lost for
    good: the default 256 MiB/s moved about 85 MB/s when every wake-up came 20 ms late. A tenth of a
    second of the rate lets the following chunks make that time up, and still bounds any interval to
    its time at the rate plus 100 ms of it.
    """
    return max(CHUNK_BYTES, int(rate_bytes_s * BURST_S))


def new_bucket(rate_bytes_s: int, burst_bytes: int | None = None) -> Bucket:
    """A full bucket; ``burst_bytes`` None: :func:`default_burst_bytes` of the rate."""
    if burst_bytes is None:
        burst_bytes = default_burst_bytes(max(0, rate_bytes_s))
    if rate_bytes_s < 0 or burst_bytes < 1:
        raise ValueError("rate must be >= 0 (0: unlimited) and burst >= 1 byte")
    return Bucket(rate_bytes_s, burst_bytes, float(burst_bytes))


def take(bucket: Bucket, n_bytes: int, now_s: float) -> tuple[Bucket, float]:
    """Take ``n_bytes`` at ``now_s``: the bucket after it and the seconds to wait before sending them.

    Pure: the caller reads the clock. A clock that steps back refills nothing (and never moves ``at_s``
    back), so a wrong clock can slow transfers but never exceed the rate.
    """
    if n_bytes < 0:
        raise ValueError("n_bytes must be >= 0")
    if bucket.rate_bytes_s == 0:
        return bucket, 0.0
    at_s = now_s if bucket.at_s is None else max(bucket.at_s, now_s)
    elapsed_s = 0.0 if bucket.at_s is None else at_s - bucket.at_s
    tokens = min(float(bucket.burst_bytes), bucket.tokens + elapsed_s * bucket.rate_bytes_s) - n_bytes
    wait_s = -tokens / bucket.rate_bytes_s if tokens < 0 else 0.0
    return Bucket(bucket.rate_bytes_s, bucket.burst_bytes, tokens, at_s), wait_s


def parse_stem(text: str) -> tuple[int, int] | None:
    """(index, epoch) of a snapshot stem exactly as ``snapshot_stem`` writes it; None for anything else.

    ASCII digits only (``str.isdigit`` takes '²' and '١'), one spelling per snapshot, index at least 1.
    """
    if not isinstance(text, str) or len(text) != 2 * _STEM_DIGITS + 1 or text[_STEM_DIGITS] != "-":
        return None
    index_text, epoch_text = text[:_STEM_DIGITS], text[_STEM_DIGITS + 1 :]
    if not set(index_text) <= _DIGITS or not set(epoch_text) <= _DIGITS:
        return None
    index, epoch = int(index_text), int(epoch_text)
    return (index, epoch) if index >= 1 else None


def _is_load_name(text: str) -> bool:
    """``load-`` and 64 lowercase hex digits (kept here, not imported: staged_loads imports this module)."""
    return (
        isinstance(text, str) and len(text) == 69 and text.startswith("load-")
        and set(text[5:]) <= frozenset("0123456789abcdef")
    )  # fmt: skip


class RangeNotSatisfiable(errors.NodeError):
    """A Range this endpoint does not serve (anything but ``bytes=N-`` with N before the end)."""

    status = 416
    code = "range_not_satisfiable"

    def __init__(self, message: str, size_bytes: int) -> None:
        super().__init__(message, size_bytes=size_bytes)
        self.size_bytes = size_bytes

    def headers(self) -> dict[str, str]:
        return {"Content-Range": f"bytes */{self.size_bytes}"}


def parse_range(value: str | None, size_bytes: int) -> int | None:
    """The offset a ``Range: bytes=N-`` asks for; None without a Range (send the whole file).

    Raises :class:`RangeNotSatisfiable` for every other form (suffix, closed, multiple ranges, other units,
    non-ASCII digits) and for N at or past the end: a resuming client never needs more, and one form is
    one code path to get right.
    """
    if value is None:
        return None
    if len(value) > MAX_RANGE_CHARS or not value.startswith("bytes=") or not value.endswith("-"):
        shown = value[:MAX_RANGE_CHARS]
        raise RangeNotSatisfiable(f"only 'Range: bytes=N-' is served, not {shown!r}", size_bytes)
    digits = value[len("bytes=") : -1]
    if not 0 < len(digits) <= 19 or not set(digits) <= _DIGITS:
        raise RangeNotSatisfiable(f"only 'Range: bytes=N-' is served, not {value!r}", size_bytes)
    start = int(digits)
    if start >= size_bytes:
        raise RangeNotSatisfiable(f"range starts at {start}, the snapshot has {size_bytes} bytes", size_bytes)
    return start


def signed_content(range_value: str | None) -> bytes:
    """What a snapshot request's signature covers besides path and sender (as its body digest)."""
    return b"range=" + (range_value or "").encode("utf-8", "surrogateescape")


def encode_meta_header(meta: SnapshotMeta) -> str:
    return base64.urlsafe_b64encode(meta.encode()).decode("ascii")


def decode_meta_header(value: str) -> SnapshotMeta:
    """Raises ValueError for anything that is not the base64url of a meta document."""
    try:
        raw = base64.urlsafe_b64decode(value.encode("ascii"))
    except (UnicodeEncodeError, binascii.Error) as exc:
        raise ValueError(f"snapshot meta header is not base64url: {exc}") from None
    return SnapshotMeta.decode(raw)


def parse_content_range(value: str | None) -> tuple[int, int, int] | None:
    """(first, last, size) of ``bytes first-last/size``; None for anything else."""
    if value is None or not value.startswith("bytes "):
        return None
    span, sep, size_text = value[len("bytes ") :].partition("/")
    first_text, dash, last_text = span.partition("-")
    parts = (first_text, last_text, size_text)
    if not sep or not dash or not all(0 < len(p) <= 19 and set(p) <= _DIGITS for p in parts):
        return None
    first, last, size = (int(p) for p in parts)
    return (first, last, size) if first <= last < size else None


# --- the rate limiter and progress --------------------------------------------------------------------------


class RateLimiter:
    """The node's one bucket (``SNAPSHOT_RATE_BYTES_S``), shared by every send and download.

    Reads the loop clock and sleeps what :func:`take` says; with rate 0 it still yields once per chunk so
    that a transfer over a fast loopback never runs chunk after chunk without letting other tasks in.
    ``burst_bytes`` None: :func:`default_burst_bytes` (which makes up for late wake-ups).
    """

    def __init__(
        self,
        rate_bytes_s: int,
        burst_bytes: int | None = None,
        *,
        clock: Callable[[], float] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._bucket = new_bucket(rate_bytes_s, burst_bytes)
        self._clock = clock  # None: the running loop's clock (tests pass their own)
        self._sleep = sleep

    @property
    def rate_bytes_s(self) -> int:
        return self._bucket.rate_bytes_s

    async def acquire(self, n_bytes: int) -> None:
        now_s = self._clock() if self._clock is not None else asyncio.get_running_loop().time()
        self._bucket, wait_s = take(self._bucket, n_bytes, now_s)
        await self._sleep(wait_s)


@dataclass(slots=True)
class TransferProgress:
    """A download's progress, updated in place by :func:`download` (mutable on purpose: the Replicator
    keeps a reference and shows :meth:`as_dict` in /cluster/status while the transfer runs)."""

    peer: str
    stem: str
    total_bytes: int
    bytes_done: int = 0
    rate_bytes_s: float = 0.0  # average of the current attempt (bytes received / seconds since it began)
    state: str = "pending"  # pending, running, done, interrupted, failed
    started_bytes: int = field(default=0, repr=False)
    started_at_s: float = field(default=0.0, repr=False)

    @property
    def eta_s(self) -> float | None:
        if self.rate_bytes_s <= 0:
            return None
        return max(0, self.total_bytes - self.bytes_done) / self.rate_bytes_s

    def begin(self, bytes_done: int, now_s: float) -> None:
        self.bytes_done = self.started_bytes = bytes_done
        self.started_at_s = now_s
        self.rate_bytes_s = 0.0
        self.state = "running"

    def advance(self, bytes_done: int, now_s: float) -> None:
        self.bytes_done = bytes_done
        elapsed_s = now_s - self.started_at_s
        if elapsed_s > 0:
            self.rate_bytes_s = (bytes_done - self.started_bytes) / elapsed_s

    def as_dict(self) -> dict[str, Any]:
        eta = self.eta_s
        return {
            "peer": self.peer, "stem": self.stem, "state": self.state, "bytes_done": self.bytes_done,
            "total": self.total_bytes, "rate_bytes_s": round(self.rate_bytes_s),
            "eta_s": None if eta is None else round(eta, 1),
        }  # fmt: skip


# --- server -----------------------------------------------------------------------------------------------


class SendsBusy(errors.Busy):
    code = "snapshot_sends_busy"

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(RETRY_AFTER_S)}


class SnapshotNotFound(errors.NotFound):
    code = "snapshot_not_found"


def _open_read(path: Path) -> BinaryIO:
    return open(path, "rb")  # noqa: SIM115 - closed by the sender, on a worker thread


def _open_at(opener: Opener, path: Path, start: int) -> tuple[BinaryIO, int]:
    """Open (worker thread): the file positioned at ``start`` and its size now."""
    fh = opener(path)
    try:
        size = fh.seek(0, os.SEEK_END)
        fh.seek(start)
    except BaseException:
        fh.close()
        raise
    return fh, size


class SnapshotSender:
    """Serves snapshot files to authenticated peers (the caller, ``ReplicationRoutes``, checked the
    signature). ``resolve`` is the Replicator's (None on a node without snapshots: every stem is 404);
    it runs on the loop, so it must be a lookup, not file I/O. ``opener`` is for tests (a reader that
    records chunk sizes or fails part way)."""

    def __init__(
        self,
        *,
        log: Any,
        rate: RateLimiter,
        max_sends: int = DEFAULT_MAX_SENDS,
        resolve: Resolve | None = None,
        opener: Opener = _open_read,
        write_timeout_s: float = WRITE_TIMEOUT_S,
    ) -> None:
        if max_sends < 1:
            raise ValueError("max_sends must be at least 1")
        self.resolve = resolve
        self.max_sends = max_sends
        self.active = 0
        self.stats = {"sends": 0, "completed": 0, "aborted": 0, "refused_busy": 0, "bytes": 0}
        self._log = log
        self._rate = rate
        self.opener = opener
        self._write_timeout_s = write_timeout_s

    async def serve(self, request: web.Request, stem: str, peer: str) -> web.StreamResponse:
        # A snapshot stem, or ``load-<sha256>``: a staged /db/load file (node.replication.staged_loads).
        named = parse_stem(stem) is not None or _is_load_name(stem)
        found = self.resolve(stem) if self.resolve is not None and named else None
        if found is None:
            raise SnapshotNotFound(f"this node has no snapshot {stem[:60]!r}")
        path, meta = found
        start = parse_range(request.headers.get("Range"), meta.size_bytes)
        if request.method == "HEAD":
            # The answer's headers only (aiohttp routes HEAD to a GET handler, and a StreamResponse would
            # put body bytes on the connection where the peer expects the next answer's status line).
            status = 206 if start is not None else 200
            response = web.StreamResponse(status=status, headers=_headers(meta, start))
            response.content_length = meta.size_bytes - (start or 0)
            await response.prepare(request)
            await response.write_eof()
            return response
        if self.active >= self.max_sends:
            self.stats["refused_busy"] += 1
            raise SendsBusy(
                f"this node already sends {self.active} snapshots (SNAPSHOT_MAX_SENDS); retry shortly"
            )
        self.active += 1
        try:
            return await self._send(request, path, meta, start, peer)
        finally:
            self.active -= 1

    async def _send(
        self, request: web.Request, path: Path, meta: SnapshotMeta, start: int | None, peer: str
    ) -> web.StreamResponse:
        offset = start or 0
        try:
            fh, size = await asyncio.to_thread(_open_at, self.opener, path, offset)
        except FileNotFoundError:
            raise SnapshotNotFound(f"snapshot {meta.stem} was removed (a newer one replaced it)") from None
        sent = offset
        outcome, reason = "aborted", ""
        try:
            if size != meta.size_bytes:
                self._log.error(
                    "snapshot_file_size_wrong", stem=meta.stem, size=size, expected=meta.size_bytes
                )
                outcome = "refused"
                raise errors.Unavailable(f"snapshot {meta.stem} is not the size its meta says; not served")
            status = 206 if start is not None else 200
            response = web.StreamResponse(status=status, headers=_headers(meta, start))
            response.content_length = size - offset
            await response.prepare(request)
            self.stats["sends"] += 1
            self._log.info("snapshot_send_start", peer=peer, stem=meta.stem, offset=offset, total=size)
            while sent < size:
                chunk = await asyncio.to_thread(fh.read, min(CHUNK_BYTES, size - sent))
                if not chunk:
                    raise OSError(f"snapshot file ended at {sent} of {size} bytes")
                await self._rate.acquire(len(chunk))
                async with asyncio.timeout(self._write_timeout_s):
                    await response.write(chunk)
                sent += len(chunk)
                self.stats["bytes"] += len(chunk)
            await response.write_eof()
            self.stats["completed"] += 1
            outcome = "done"
            return response
        except (OSError, TimeoutError) as exc:
            # Headers are out: no JSON error can follow. Cutting the connection is what tells the peer the
            # body is incomplete (it resumes from what it has).
            reason = f"{type(exc).__name__}: {exc}"[:200]
            if request.transport is not None:
                request.transport.abort()
            raise ConnectionResetError(f"snapshot send of {meta.stem} aborted") from None
        except asyncio.CancelledError:
            outcome = "cancelled"  # the peer went away and the server cancelled the handler
            raise
        finally:
            if outcome in ("aborted", "cancelled"):
                self.stats["aborted"] += 1
            if outcome != "refused":
                self._log.info(
                    "snapshot_send_end", peer=peer, stem=meta.stem, sent=sent - offset, outcome=outcome,
                    **({"reason": reason} if reason else {}),
                )  # fmt: skip
            await asyncio.to_thread(fh.close)


def _headers(meta: SnapshotMeta, start: int | None) -> dict[str, str]:
    headers = {
        META_HEADER: encode_meta_header(meta), "ETag": f'"{meta.sha256}"', "Accept-Ranges": "bytes",
        "Content-Type": "application/octet-stream",
    }  # fmt: skip
    if start is not None:
        headers["Content-Range"] = f"bytes {start}-{meta.size_bytes - 1}/{meta.size_bytes}"
    return headers


# --- client -----------------------------------------------------------------------------------------------


class TransferError(Exception):
    """A download did not complete; the part is kept (resume later) unless the subclass says otherwise."""


class TransferInterrupted(TransferError):
    """The connection broke, stalled past the stall timeout or ended early; the part holds what arrived."""


class TransferRefused(TransferError):
    """The server answered with an error status (401, 404, 416, 503...)."""

    def __init__(self, message: str, status: int, retry_after_s: float | None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s


class SnapshotMismatch(TransferError):
    """The server holds a different snapshot under that stem (or sent something else): the part was
    removed, since its bytes cannot be told apart from the other file's."""


def peer_headers(signer: peerauth.Signer) -> SignHeaders:
    """``sign_headers`` for :func:`download`: signs with this process's peer signer (the replication
    transport's, so its incarnation and sequence numbers are the ones peers already track)."""

    def sign(path: str, range_value: str | None) -> dict[str, str]:
        return {
            peerauth.HEADER: signer.next_header(path, 0, signed_content(range_value)),
            SENDER_HEADER: signer.sender,
        }

    return sign


def snapshot_url(base_url: str, stem: str) -> str:
    """The URL of a snapshot on a peer (``base_url`` as ``Endpoint.url``: http://ip:port)."""
    return f"{base_url.rstrip('/')}{PATH_PREFIX}{stem}"


def _prepare_part(part: Path, size_bytes: int) -> int:
    """(worker thread) The bytes already in the part; a part longer than the snapshot is emptied."""
    part.parent.mkdir(parents=True, exist_ok=True)
    with open(part, "ab") as fh:
        done = fh.seek(0, os.SEEK_END)
        if done > size_bytes:
            fh.truncate(0)
            done = 0
    return done


def _open_part(part: Path, offset: int) -> BinaryIO:
    """(worker thread) The part opened for appending at ``offset`` (0: emptied first)."""
    fh = open(part, "r+b")  # noqa: SIM115 - closed by download(), on a worker thread
    try:
        fh.truncate(offset)
        fh.seek(offset)
    except BaseException:
        fh.close()
        raise
    return fh


def _write_chunk(fh: BinaryIO, data: bytes | bytearray) -> None:
    fh.write(data)


def _finish_part(fh: BinaryIO, sync: bool) -> None:
    """(worker thread) Flush and, after a complete download, fsync the part's data (not its directory:
    the part is renamed by the store, which fsyncs that directory)."""
    try:
        fh.flush()
        if sync:
            os.fsync(fh.fileno())
    finally:
        fh.close()


def _remove(part: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        part.unlink()


def _retry_after(value: str | None) -> float | None:
    if value is None or not value.isascii() or not value.isdigit() or len(value) > 6:
        return None
    return float(value)


async def fetch_meta(
    session: aiohttp.ClientSession,
    url: str,
    *,
    sign_headers: SignHeaders,
    timeout_s: float = CONNECT_TIMEOUT_S,
) -> SnapshotMeta:
    """What the peer holds under that stem (a HEAD: headers only, no send slot taken). An offer names only
    the snapshot's (epoch, index); its size, digest and configuration come from here, and :func:`download`
    then checks every answer against them. Raises :class:`TransferRefused` (401, 404, 503...),
    :class:`TransferInterrupted` (no answer) or :class:`TransferError` (no valid meta)."""
    headers = dict(sign_headers(URL(url).path, None))
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    try:
        async with session.head(url, headers=headers, timeout=timeout, allow_redirects=False) as resp:
            if resp.status != 200:
                raise TransferRefused(
                    f"snapshot meta from {URL(url).authority}: HTTP {resp.status}",
                    resp.status,
                    _retry_after(resp.headers.get("Retry-After")),
                )
            try:
                return decode_meta_header(resp.headers.get(META_HEADER, ""))
            except ValueError as exc:
                raise TransferError(f"snapshot meta from {URL(url).authority}: {exc}") from None
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise TransferInterrupted(
            f"snapshot meta from {URL(url).authority}: {type(exc).__name__}: {exc}"[:300]
        ) from exc


async def download(
    session: aiohttp.ClientSession,
    url: str,
    meta: SnapshotMeta,
    part: Path,
    *,
    sign_headers: SignHeaders,
    log: Any,
    rate: RateLimiter | None = None,
    progress: TransferProgress | None = None,
    stall_timeout_s: float = STALL_TIMEOUT_S,
    connect_timeout_s: float = CONNECT_TIMEOUT_S,
    progress_every_s: float = PROGRESS_LOG_S,
) -> None:
    """Download the snapshot ``meta`` from ``url`` into ``part``, resuming from the part's current size.

    Returns once the part holds ``meta.size_bytes`` bytes, flushed and fsynced (one fsync of the data: cheap
    next to the transfer, and it means a part that ``finish_incoming`` sees complete survives a crash;
    the rename and directory fsync stay the store's). The SHA-256 is not checked here.

    Raises :class:`TransferInterrupted` (part kept), :class:`TransferRefused` (an error status: 401, 404,
    503 with ``retry_after_s``...; part kept), :class:`SnapshotMismatch` (the server's meta is another one,
    or it answers 416 to an offset below the expected size; part removed) or :class:`TransferError` (a
    malformed answer; part kept). OSError from the local disk propagates (part kept).
    Cancellation leaves the part as it is (all bytes written so far are in it).
    """
    loop = asyncio.get_running_loop()
    peer = URL(url).authority
    if progress is None:
        progress = TransferProgress(peer=peer, stem=meta.stem, total_bytes=meta.size_bytes)
    done = await asyncio.to_thread(_prepare_part, part, meta.size_bytes)
    progress.begin(done, loop.time())
    if done == meta.size_bytes:
        fh = await asyncio.to_thread(_open_part, part, done)
        await asyncio.to_thread(_finish_part, fh, True)
        progress.state = "done"
        log.info("snapshot_transfer_end", peer=peer, stem=meta.stem, bytes_done=done, total=meta.size_bytes,
                 outcome="already_complete")  # fmt: skip
        return
    range_value = f"bytes={done}-" if done else None
    headers = dict(sign_headers(URL(url).path, range_value))
    if range_value is not None:
        headers["Range"] = range_value
    headers["Accept-Encoding"] = "identity"
    timeout = aiohttp.ClientTimeout(total=None, connect=connect_timeout_s, sock_read=stall_timeout_s)
    log.info("snapshot_transfer_start", peer=peer, stem=meta.stem, offset=done, total=meta.size_bytes)
    outcome = "failed"
    try:
        async with session.get(
            url, headers=headers, timeout=timeout, allow_redirects=False, auto_decompress=False
        ) as resp:
            offset = await _check_answer(resp, meta, part, done)
            progress.begin(offset, loop.time())
            outcome = await _receive(resp, meta, part, offset, rate, progress, log, peer, progress_every_s)
    except (aiohttp.ClientError, TimeoutError) as exc:
        outcome = "interrupted"
        raise TransferInterrupted(
            f"snapshot {meta.stem} from {peer} interrupted at {progress.bytes_done} of {meta.size_bytes} "
            f"bytes: {type(exc).__name__}: {exc}"[:300]
        ) from exc
    except asyncio.CancelledError:
        outcome = "cancelled"
        raise
    except SnapshotMismatch:
        outcome = "mismatch"
        raise
    except TransferRefused:
        outcome = "refused"
        raise
    finally:
        progress.state = {"done": "done", "interrupted": "interrupted"}.get(outcome, "failed")
        log.info(
            "snapshot_transfer_end", peer=peer, stem=meta.stem, bytes_done=progress.bytes_done,
            total=meta.size_bytes, outcome=outcome,
        )  # fmt: skip


async def _check_answer(resp: aiohttp.ClientResponse, meta: SnapshotMeta, part: Path, done: int) -> int:
    """The offset the body starts at (0 after a 200, ``done`` after the matching 206); raises otherwise."""
    if resp.status == 416:
        # Only offsets below the expected size are asked for: the server's file is shorter, so it is
        # another snapshot, and the part cannot be resumed from any server that holds this one's stem.
        await asyncio.to_thread(_remove, part)
        raise SnapshotMismatch(f"snapshot {meta.stem} from {resp.url.authority} cannot serve bytes={done}-")
    if resp.status not in (200, 206):
        body = await resp.content.read(MAX_ERROR_BODY_BYTES)
        raise TransferRefused(
            f"snapshot {meta.stem}: HTTP {resp.status}: {body[:300].decode('utf-8', 'replace')}",
            resp.status,
            _retry_after(resp.headers.get("Retry-After")),
        )
    try:
        theirs = decode_meta_header(resp.headers.get(META_HEADER, ""))
    except ValueError as exc:
        # No proof the part is wrong (a proxy may have dropped the header): keep it, refuse this answer.
        raise TransferError(
            f"snapshot {meta.stem} from {resp.url.authority}: no valid meta header: {exc}"
        ) from None
    if theirs != meta:
        await asyncio.to_thread(_remove, part)
        raise SnapshotMismatch(
            f"snapshot {meta.stem} from {resp.url.authority} is another snapshot under that stem "
            f"(sha256 {theirs.sha256[:12]}..., {theirs.size_bytes} bytes)"
        )
    offset = 0
    if resp.status == 206:
        span = parse_content_range(resp.headers.get("Content-Range"))
        if span != (done, meta.size_bytes - 1, meta.size_bytes):
            raise TransferError(f"snapshot {meta.stem}: Content-Range {resp.headers.get('Content-Range')!r} "
                                f"does not answer bytes={done}-")  # fmt: skip
        offset = done
    if resp.content_length is not None and resp.content_length != meta.size_bytes - offset:
        raise TransferError(f"snapshot {meta.stem}: Content-Length {resp.content_length} does not match")
    return offset


async def _receive(
    resp: aiohttp.ClientResponse,
    meta: SnapshotMeta,
    part: Path,
    offset: int,
    rate: RateLimiter | None,
    progress: TransferProgress,
    log: Any,
    peer: str,
    progress_every_s: float,
) -> str:
    """Append the body to the part in chunks of at most CHUNK_BYTES; 'done' or raises. Whatever arrived
    before a failure is written first, so the part always ends where the received bytes end."""
    loop = asyncio.get_running_loop()
    fh = await asyncio.to_thread(_open_part, part, offset)
    complete = False
    done = offset
    buffer = bytearray()
    next_log_s = loop.time() + progress_every_s
    try:
        # Bounded: every round receives at least one byte (or ends), and at most size - offset arrive.
        for _ in range(meta.size_bytes - offset + 1):
            want = min(CHUNK_BYTES, meta.size_bytes - done) - len(buffer)  # >= 1: full buffers were written
            received = await resp.content.read(want)
            if received:
                buffer += received
            if not received or len(buffer) >= CHUNK_BYTES or done + len(buffer) >= meta.size_bytes:
                if buffer:
                    if rate is not None:
                        await rate.acquire(len(buffer))
                    data, buffer = buffer, bytearray()  # handed over, not copied
                    await asyncio.to_thread(_write_chunk, fh, data)
                    done += len(data)
                    progress.advance(done, loop.time())
                if loop.time() >= next_log_s:
                    next_log_s = loop.time() + progress_every_s
                    _log_progress(log, progress, peer)
            if not received or done >= meta.size_bytes:
                break
        if done < meta.size_bytes:
            raise aiohttp.ClientPayloadError(f"the body ended at {done} of {meta.size_bytes} bytes")
        if await resp.content.read(1):
            raise TransferError(f"snapshot {meta.stem}: the server sent more than {meta.size_bytes} bytes")
        complete = True
    finally:
        try:
            if buffer:
                await asyncio.to_thread(_write_chunk, fh, buffer)
                progress.advance(done + len(buffer), loop.time())
        finally:
            await asyncio.to_thread(_finish_part, fh, complete)
    _log_progress(log, progress, peer)
    return "done"


def _log_progress(log: Any, progress: TransferProgress, peer: str) -> None:
    eta = progress.eta_s
    log.info(
        "snapshot_transfer_progress", peer=peer, stem=progress.stem, bytes_done=progress.bytes_done,
        total=progress.total_bytes, rate_bytes_s=round(progress.rate_bytes_s),
        eta_s=None if eta is None or not math.isfinite(eta) else round(eta, 1),
    )  # fmt: skip
