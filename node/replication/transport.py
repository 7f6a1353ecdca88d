"""Replication messages between peers: batched, pipelined, signed over the body, on kept-alive connections.

Why not one HTTP request per message: a leader sends heartbeats to every member every few tens of
milliseconds and Appends for every client batch; a request each would cost a round trip each. Instead each
peer has one bounded queue and ``WORKERS_PER_PEER`` workers; a worker takes everything queued (up to
``MAX_BATCH_MESSAGES``) and sends it as one batch, so batches are pipelined and their size follows the load.
When the peer's stream is open and no write to it is under way, what was queued in a loop step is written
at the end of that step by a callback instead (no worker task is woken: see ``_flush``); a write that has
to wait for the socket goes on in a task that holds the peer's write lock, and the workers take over
behind it, so frames always leave in queue order.

How a batch travels: on the peer's **stream** when one is open (``GET /cluster/replication/stream``, a
WebSocket: one long-lived connection per peer and direction, each batch one binary frame, answered by
nothing; see the frame format in ``node.replication.codec``), else as a ``POST /cluster/replication``
(signed, answered). Profiling showed the POST's request/response work on both nodes, not the fsync, was
most of a replicated write's latency; a frame costs a fraction of it and needs no answer, so any number of
frames are in flight. The stream is opened on the first batch to a peer and again after it breaks, at most
every ``STREAM_RETRY_S``; while it is down (the peer is restarting, or is a release without the stream:
404, then ``STREAM_RETRY_OLD_S``) batches go as POSTs, so nothing depends on it. A frame that cannot be
written within the peer timeout closes the stream (the batch is then POSTed, and lost if that fails too).
The receiver sends this node, over the same connection, what a POST answer would say (its identity, cluster
facts) when the stream opens and whenever that changes.

Refused connections: when a peer's stream closes, it is reopened at once; a connection the peer's host
refuses (ECONNREFUSED: nothing listens on that port, the process is gone) is noted (``recently_refused``)
until anything succeeds with that peer again. The Replicator leaves such a peer out of the view it gives the
core for a moment, so a leader killed with SIGKILL is replaced when its lease runs out rather than when
failure detection has counted its missed probes. It changes only who is tried as leader, never safety
(epochs, promises and leases decide that).

Overflow policy of a peer queue (``MAX_QUEUED_MESSAGES``): the oldest heartbeat (or heartbeat ack) is
dropped first, else the oldest message. Loss is what the core tolerates anyway: unacknowledged Appends and
Prepares are resent after ``resend_s``, a new heartbeat round follows every ``heartbeat_s``. A peer that
does not answer loses its batch (counted); the core resends.

Signing (``node.core.peerauth``): one :class:`~node.core.peerauth.Signer` for this process's replication
batches (the node's incarnation, its own sequence counter), over the path, the sender address and the
SHA-256 of the body. The receiver keeps its own ReplayGuard for this path, so a replayed batch is refused
and changes nothing.

Identities: the core speaks of persistent identities, HTTP of addresses. Every batch names its sender's
identity and address; every answer names the receiver's identity, whether it belongs to a cluster and
(``cluster``) the leader it follows, that leader's ID and whether it holds client data, which the
formation rules (``node.core.replication.formation``) need to tell clusters apart. An
empty batch (``ping``) is how a node learns the identity behind an address it found in its view.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
from collections.abc import Callable, Coroutine, Generator
from typing import Any

import aiohttp
import orjson

from node.core import peerauth
from node.core.ids import Endpoint
from node.core.replication import messages as msg
from node.replication import codec

PATH = "/cluster/replication"
STREAM_PATH = "/cluster/replication/stream"
HELLO_HEADER = "X-TalentNest-Stream"
STREAM_RETRY_S = 0.25  # after a stream could not be opened or broke: batches go as POSTs meanwhile
STREAM_RETRY_OLD_S = 30.0  # after a 404/405: the peer runs a release without the stream
MAX_QUEUED_MESSAGES = 4096
MAX_BATCH_MESSAGES = 256
# Entry payload bytes a batch carries (its first message always goes, whatever its size). Why: the receiver
# refuses a batch over 64 MiB (``node.http.replication.MAX_BATCH_BYTES``: 413, or a stream frame too big)
# and payloads travel as base64 in JSON (4/3 of their size). 256 Appends of up to 1 MiB each made batches
# of 80+ MiB when a member caught up on large entries: every one refused, resent and refused again, the
# member never caught up and the leader lost its lease over and over.
MAX_BATCH_PAYLOAD_BYTES = 16 << 20
WORKERS_PER_PEER = 2
ANSWER_MAX_BYTES = 4096
FAILURE_BACKOFF_S = 0.05


class WriteLock:
    """The FIFO lock of one peer's stream writes (frames must leave in their numbered order), which a caller
    that must not wait can also take at once when it is free (:meth:`try_acquire`).

    Why not ``asyncio.Lock``: the direct write at the end of a loop step (``ReplicationTransport._flush``)
    runs in a callback, not a task, so it cannot await even an uncontended acquire. Release hands the lock
    to the oldest waiter directly (it stays held), so nothing can take it between the release and that
    waiter's turn: a batch taken from the queue and waiting here is always written before any later one."""

    __slots__ = ("_held", "_waiters")

    def __init__(self) -> None:
        self._held = False
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    def locked(self) -> bool:
        return self._held

    def try_acquire(self) -> bool:
        if self._held:
            return False
        self._held = True
        return True

    async def acquire(self) -> None:
        if self.try_acquire():
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed the lock, then cancelled before it ran: pass it on
            raise  # (a cancelled waiter left in the deque is skipped by release)

    def release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # handed over: stays held
                return
        self._held = False

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *_exc: object) -> None:
        self.release()


class _Peer:
    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        # (the sender's cluster when the message was made, message): a batch holds one cluster's messages.
        self.queue: collections.deque[tuple[str, msg.Message]] = collections.deque()
        self.ping = False
        # Workers with nothing to do wait on a future each (oldest first); new work wakes ONE of them, and
        # none while one already woken has not yet taken the queue. Why not one Event for all: it woke every
        # worker for every batch, and all but one found the queue empty again (a wasted task step per batch
        # and peer, most of the time with the stream, where a frame is written without waiting).
        self.idle: collections.deque[asyncio.Future[None]] = collections.deque()
        self.waking = False
        self.tasks: list[asyncio.Task] = []
        # The stream to this peer (None while closed), its frame MAC and last frame number; one writer at
        # a time (frames must leave in their numbered order).
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.mac: codec.FrameMac | None = None
        self.frame_seq = 0
        self.ws_lock = WriteLock()
        self.stream_retry_at = 0.0
        self.flush_due = False  # in the transport's list of peers to flush at the end of this loop step

    def put(self, cluster: str, message: msg.Message, stats: dict[str, int], *, wake: bool = True) -> None:
        """Queue the message (see the overflow policy); ``wake``: hand the queue to an idle worker now (the
        transport instead flushes the queue itself once the current loop step is over)."""
        if len(self.queue) >= MAX_QUEUED_MESSAGES:
            for i, (_, queued) in enumerate(self.queue):
                if isinstance(queued, msg.Heartbeat | msg.HeartbeatAck):
                    del self.queue[i]
                    break
            else:
                self.queue.popleft()
            stats["dropped"] += 1
        self.queue.append((cluster, message))
        if wake:
            self.wake_one()

    def put_back(self, cluster: str, batch: list[msg.Message]) -> None:
        """A batch taken but not written goes back to the front of the queue, in its order (the queue held
        it a moment ago, so this keeps within its bound)."""
        self.queue.extendleft((cluster, m) for m in reversed(batch))

    def wake_one(self) -> None:
        """Hand the queue to one idle worker, unless one was already woken for it."""
        if self.waking:
            return
        while self.idle:
            waiter = self.idle.popleft()
            if not waiter.done():  # a worker cancelled while idle left its future behind, cancelled
                waiter.set_result(None)
                self.waking = True
                return

    async def wait_for_work(self) -> None:
        """Wait until :meth:`wake_one` picks this worker (the caller then looks at the queue again)."""
        waiter = asyncio.get_running_loop().create_future()
        self.idle.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.waking = False  # woken, then cancelled before it ran: let the next put wake another
            raise
        self.waking = False

    def take(self) -> tuple[str, list[msg.Message]]:
        """The next batch: up to MAX_BATCH_MESSAGES queued messages of one cluster, in queue order, with at
        most MAX_BATCH_PAYLOAD_BYTES of entry payloads (unless its first message alone has more)."""
        queue = self.queue
        if not queue:
            return "", []
        if len(queue) == 1:  # the usual case at low load: its first message always goes, whatever its size
            cluster, message = queue.popleft()
            return cluster, [message]
        cluster = queue[0][0]
        batch: list[msg.Message] = []
        payload_bytes = 0
        while queue and len(batch) < MAX_BATCH_MESSAGES:
            item_cluster, message = queue[0]
            if item_cluster != cluster:
                break
            size = entry_payload_bytes(message)
            if batch and payload_bytes + size > MAX_BATCH_PAYLOAD_BYTES:
                break
            payload_bytes += size
            queue.popleft()
            batch.append(message)
        return cluster, batch


def entry_payload_bytes(message: msg.Message) -> int:
    """The log entry payload bytes a message carries (Append, FetchReply); 0 for the others."""
    entries = getattr(message, "entries", None)
    if type(entries) is not tuple:
        return 0
    total = 0
    for entry in entries:  # (a loop: sum over a generator costs more than the one or few entries it adds)
        total += len(entry.payload)
    return total


class ReplicationTransport:
    def __init__(
        self,
        *,
        secret: str,
        me: Endpoint,
        identity: str,
        timeout_s: float,
        learn: Callable[[Endpoint, str, bool, tuple[str | None, int, bool, str] | None], None],
        log: Any,
        refused: Callable[[Endpoint], None] | None = None,
    ) -> None:
        self._key = peerauth.derive_key(secret)
        self._me = me
        self._identity = identity
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._send_timeout_s = timeout_s
        self._me_text = str(me)
        # The same entries go to every follower: each is encoded once (see codec.EntryCache).
        self._entries = codec.EntryCache()
        self._learn = learn
        self._log = log
        self._signer: peerauth.Signer | None = None
        self._session: aiohttp.ClientSession | None = None
        self._peers: dict[Endpoint, _Peer] = {}
        self._due: list[_Peer] = []  # peers with messages queued in this loop step (see _flush)
        self._group: asyncio.TaskGroup | None = None
        self.stats = {"batches": 0, "messages": 0, "failed": 0, "dropped": 0, "frames": 0, "streams": 0}
        self._failing: set[Endpoint] = set()
        self._on_refused = refused
        self._refused: dict[Endpoint, float] = {}  # peer -> loop time a connection to it was refused

    def recently_refused(self, endpoint: Endpoint, now: float, hold_s: float) -> bool:
        """A connection to the peer was refused within ``hold_s`` and nothing succeeded with it since."""
        at = self._refused.get(endpoint)
        return at is not None and now - at <= hold_s

    def note_alive(self, endpoint: Endpoint) -> None:
        """Something worked with the peer (it answered, or a batch from it arrived)."""
        if self._refused.pop(endpoint, None) is not None and self._on_refused is not None:
            self._on_refused(endpoint)

    def _note_failure(self, endpoint: Endpoint, exc: BaseException) -> None:
        if _is_refused(exc):
            first = endpoint not in self._refused
            self._refused[endpoint] = asyncio.get_running_loop().time()
            if first and self._on_refused is not None:
                self._on_refused(endpoint)

    def begin(self, incarnation: int) -> None:
        self._signer = peerauth.Signer(self._key, str(self._me), incarnation)

    @property
    def signer(self) -> peerauth.Signer | None:
        """This process's peer signer (None before :meth:`begin`). Snapshot downloads sign with it too
        (``snapshot_transfer.peer_headers``): one incarnation and one sequence counter per process, and
        each receiving route keeps its own replay window, so the shared counter only shows them gaps."""
        return self._signer

    async def run(self) -> None:
        """Own the session and every peer worker until cancelled."""
        connector = aiohttp.TCPConnector(limit=256, limit_per_host=WORKERS_PER_PEER + 2, use_dns_cache=False)
        async with aiohttp.ClientSession(connector=connector) as session, asyncio.TaskGroup() as tg:
            self._session, self._group = session, tg
            for peer in self._peers.values():
                self._start(peer)
            try:
                await asyncio.Event().wait()
            finally:
                self._group = None
                for peer in self._peers.values():
                    for task in peer.tasks:
                        task.cancel()
                    if peer.ws is not None:
                        peer.ws, ws = None, peer.ws
                        with contextlib.suppress(Exception):
                            await asyncio.wait_for(ws.close(), 0.2)

    def _start(self, peer: _Peer) -> None:
        if self._group is not None and not peer.tasks:
            peer.tasks = [
                self._group.create_task(self._worker(peer), name=f"replication-to-{peer.endpoint}")
                for _ in range(WORKERS_PER_PEER)
            ]

    def _peer(self, endpoint: Endpoint) -> _Peer:
        peer = self._peers.get(endpoint)
        if peer is None:
            peer = self._peers[endpoint] = _Peer(endpoint)
            self._start(peer)
        return peer

    def send(self, endpoint: Endpoint, message: msg.Message, cluster: str = "") -> None:
        """Queue a message made while this node was in ``cluster`` (never blocks; see the overflow
        policy). The cluster is the one of the message, not of the moment it leaves: a message made before
        this node left a cluster must not reach another cluster as if this node had none."""
        peer = self._peer(endpoint)
        peer.put(cluster, message, self.stats, wake=False)
        if not peer.flush_due:
            peer.flush_due = True
            self._due.append(peer)
            if len(self._due) == 1:
                try:
                    asyncio.get_running_loop().call_soon(self._flush)
                except RuntimeError:  # no loop runs (nothing can be sent now): the workers take it later
                    self._due.clear()
                    peer.flush_due = False
                    peer.wake_one()

    def _flush(self) -> None:
        """End of the loop step in which messages were queued: write each peer's queue to its stream at once
        when the stream is open and no write to it is under way; else hand it to a worker as before.

        Why: waking a worker task for every batch (its future, its task step, the write lock, the timeout
        wrapper: a few task hops per frame) was a large share of the sender's CPU per frame, although the
        stream takes a frame without waiting unless its socket's buffer is full. Messages queued in one
        step still go together (this runs after the step, once per peer). Never blocks: a write that has
        to wait (flow control) goes on in a task of its own that holds the peer's write lock, so frames
        leave in queue order and the workers take over behind it."""
        due, self._due = self._due, []
        for peer in due:
            peer.flush_due = False
        try:
            for peer in due:
                if peer.queue and not self._write_queued(peer):
                    peer.wake_one()
        except BaseException:
            for peer in due:  # whatever failed, no queue is left without a worker to take it
                if peer.queue:
                    peer.wake_one()
            raise

    def _write_queued(self, peer: _Peer) -> bool:
        """Write the peer's queue to its stream now, as frames of at most one batch each; False (nothing
        written of what is left queued) when the stream is not open, another write holds it, or it broke."""
        ws, group = peer.ws, self._group
        if ws is None or ws.closed or peer.mac is None or group is None or not peer.ws_lock.try_acquire():
            return False
        held = True
        try:
            while peer.queue:
                cluster, batch = peer.take()
                body = codec.encode_batch(self._identity, self._me_text, batch, cluster, cache=self._entries)
                peer.frame_seq += 1
                send = ws.send_bytes(codec.encode_frame(peer.mac, peer.frame_seq, body))
                try:
                    waiting = send.send(None)
                except StopIteration:
                    self.stats["frames"] += 1
                    self.stats["messages"] += len(batch)
                    continue
                except (aiohttp.ClientError, OSError, RuntimeError) as exc:
                    self._close_stream(peer, f"send failed: {exc!r}"[:200])
                    peer.put_back(cluster, batch)  # the workers send it: on a new stream, else as a POST
                    return False
                finish = self._finish_write(peer, ws, send, waiting, batch, cluster)
                try:
                    group.create_task(finish, name=f"replication-write-{peer.endpoint}")
                except RuntimeError:  # the transport is stopping (its TaskGroup takes no new task)
                    finish.close()
                    send.close()
                    return True
                held = False  # the task releases the lock once the write is done
                return True
            return True
        finally:
            if held:
                peer.ws_lock.release()

    async def _finish_write(
        self,
        peer: _Peer,
        ws: aiohttp.ClientWebSocketResponse,
        send: Coroutine[Any, Any, None],
        waiting: Any,
        batch: list[msg.Message],
        cluster: str,
    ) -> None:
        """The rest of a frame write that had to wait (started by :meth:`_write_queued`, which handed this
        task the peer's write lock), within the peer timeout as :func:`send_within` bounds it; then the
        workers take what was queued meanwhile. A write that fails closes the stream and its batch is
        POSTed, as a worker does."""
        try:
            try:
                async with asyncio.timeout(self._send_timeout_s):
                    await _Rest(send, waiting)
            except (aiohttp.ClientError, TimeoutError, OSError, RuntimeError) as exc:
                if peer.ws is ws:
                    self._close_stream(peer, f"send failed: {exc!r}"[:200])
                sent = False
            else:
                self.stats["frames"] += 1
                self.stats["messages"] += len(batch)
                sent = True
        finally:
            peer.ws_lock.release()
            if peer.queue:
                peer.wake_one()
        if not sent:
            await self._post(peer.endpoint, batch, cluster)

    def ping(self, endpoint: Endpoint) -> None:
        """Send an empty batch soon, to learn the peer's identity from its answer."""
        peer = self._peer(endpoint)
        peer.ping = True
        peer.wake_one()

    async def _worker(self, peer: _Peer) -> None:
        while True:
            if not peer.queue and not peer.ping:
                await peer.wait_for_work()
                continue
            cluster, batch = peer.take()
            peer.ping = False
            if batch and await self._send_frame(peer, batch, cluster):
                continue  # an empty batch (a ping) is a POST: its answer says who the peer is
            if not await self._post(peer.endpoint, batch, cluster):
                await asyncio.sleep(FAILURE_BACKOFF_S)  # a dead peer refuses at once: do not spin on it

    async def _send_frame(self, peer: _Peer, batch: list[msg.Message], cluster: str) -> bool:
        """Send the batch as one frame of the peer's stream (opened if need be); False if it was not sent."""
        body = codec.encode_batch(self._identity, self._me_text, batch, cluster, cache=self._entries)
        async with peer.ws_lock:
            ws = peer.ws if peer.ws is not None and not peer.ws.closed else await self._open_stream(peer)
            if ws is None or peer.mac is None:
                return False
            peer.frame_seq += 1
            frame = codec.encode_frame(peer.mac, peer.frame_seq, body)
            try:
                await send_within(ws.send_bytes(frame), self._send_timeout_s)
            except (aiohttp.ClientError, TimeoutError, OSError, RuntimeError) as exc:
                self._close_stream(peer, f"send failed: {exc!r}"[:200])
                return False
        self.stats["frames"] += 1
        self.stats["messages"] += len(batch)
        return True

    async def _open_stream(self, peer: _Peer) -> aiohttp.ClientWebSocketResponse | None:
        assert self._session is not None and self._signer is not None
        loop = asyncio.get_running_loop()
        if loop.time() < peer.stream_retry_at or self._group is None:
            return None
        peer.stream_retry_at = loop.time() + STREAM_RETRY_S
        hello = codec.encode_hello(self._identity, str(self._me))
        header = self._signer.next_header(STREAM_PATH, 0, hello)
        parsed = peerauth.parse(header)
        assert parsed is not None
        claims = parsed[0]
        try:
            async with asyncio.timeout(self._timeout.total):
                ws = await self._session.ws_connect(
                    f"{peer.endpoint.url}{STREAM_PATH}",
                    headers={peerauth.HEADER: header, HELLO_HEADER: hello.decode()},
                    autoclose=True, autoping=True, max_msg_size=ANSWER_MAX_BYTES, compress=0,
                )  # fmt: skip
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status in (404, 405):
                peer.stream_retry_at = loop.time() + STREAM_RETRY_OLD_S
            return None
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            self._note_failure(peer.endpoint, exc)
            return None
        self.note_alive(peer.endpoint)
        peer.ws, peer.frame_seq = ws, 0
        peer.mac = codec.FrameMac(self._key, str(self._me), claims.incarnation, claims.seq)
        self.stats["streams"] += 1
        self._group.create_task(self._read_answers(peer, ws), name=f"replication-stream-{peer.endpoint}")
        return ws

    def _close_stream(self, peer: _Peer, reason: str) -> None:
        ws, peer.ws, peer.mac = peer.ws, None, None
        if ws is not None and not ws.closed and self._group is not None:
            self._group.create_task(_close_quietly(ws))
        if peer.endpoint not in self._failing:
            self._log.info("replication_stream_closed", peer=str(peer.endpoint), reason=reason)

    async def _read_answers(self, peer: _Peer, ws: aiohttp.ClientWebSocketResponse) -> None:
        """The receiver's facts over the stream, until it closes (owned by the transport's TaskGroup)."""
        try:
            async for frame in ws:
                if frame.type is aiohttp.WSMsgType.TEXT:
                    with contextlib.suppress(orjson.JSONDecodeError):
                        self._learn_answer(peer.endpoint, orjson.loads(frame.data))
        except (aiohttp.ClientError, OSError, RuntimeError):
            pass
        finally:
            if peer.ws is ws:
                # Closed by the peer's side (it stopped or was killed): reopen at once, which tells a peer
                # that is gone (refused) from one that restarted, without waiting for the next batch.
                peer.ws, peer.mac = None, None
                peer.stream_retry_at = 0.0
                if self._group is not None:
                    self._group.create_task(self._reopen(peer), name=f"replication-reopen-{peer.endpoint}")

    async def _reopen(self, peer: _Peer) -> None:
        async with peer.ws_lock:
            if peer.ws is None:
                await self._open_stream(peer)

    async def _post(self, endpoint: Endpoint, batch: list[msg.Message], cluster: str = "") -> bool:
        assert self._session is not None and self._signer is not None
        body = codec.encode_batch(self._identity, self._me_text, batch, cluster, cache=self._entries)
        headers = {
            "Content-Type": "application/json",
            peerauth.HEADER: self._signer.next_header(PATH, 0, body),
        }
        try:
            async with self._session.post(
                f"{endpoint.url}{PATH}", data=body, headers=headers, timeout=self._timeout
            ) as resp:
                raw = await resp.content.read(ANSWER_MAX_BYTES + 1)
                if resp.status != 200:
                    raise aiohttp.ClientError(f"HTTP {resp.status}: {raw[:200]!r}")
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            self.stats["failed"] += 1
            self._note_failure(endpoint, exc)
            if endpoint not in self._failing:
                self._failing.add(endpoint)
                self._log.info("replication_peer_unreachable", peer=str(endpoint), reason=str(exc)[:200])
            return False
        self.note_alive(endpoint)
        if endpoint in self._failing:
            self._failing.discard(endpoint)
            self._log.info("replication_peer_reachable", peer=str(endpoint))
        self.stats["batches"] += 1
        self.stats["messages"] += len(batch)
        try:
            answer = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return True
        self._learn_answer(endpoint, answer)
        return True

    def _learn_answer(self, endpoint: Endpoint, answer: object) -> None:
        """What a peer said of itself (a POST's answer, or a stream's facts frame), validated."""
        if isinstance(answer, dict) and isinstance(answer.get("identity"), str):
            identity = answer["identity"]
            if 0 < len(identity) <= codec.MAX_IDENTITY_CHARS:
                self._learn(
                    endpoint, identity, answer.get("member") is True, _cluster_of(answer.get("cluster"))
                )


def _is_refused(exc: BaseException) -> bool:
    """The peer's host refused the connection: nothing listens there (the process is gone)."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        return exc.os_error.errno == errno.ECONNREFUSED
    return isinstance(exc, ConnectionRefusedError)


async def send_within(send: Coroutine[Any, Any, None], timeout_s: float) -> None:
    """Run ``send`` (a stream write, not yet started), raising TimeoutError if it has not finished within
    ``timeout_s`` (it is then cancelled, as ``asyncio.timeout`` would).

    Why not ``asyncio.timeout`` around every write: a frame is almost always written at once (aiohttp hands
    it to the socket and waits only when the socket's buffer is full: flow control), yet the timeout context
    costs a timer on the loop per frame, about as much as the write itself. So the write runs one step
    first; only if it has to wait (the only way a write to a stuck peer can hang) does the rest of it run
    under the timeout. Both start at once, so a stuck peer is detected in the same time as before."""
    try:
        waiting = send.send(None)
    except StopIteration:
        return
    async with asyncio.timeout(timeout_s):
        await _Rest(send, waiting)


class _Rest:
    """Awaitable: the rest of a coroutine already run up to its first wait (``waiting``, what it yielded),
    driven as ``await`` would drive it (results and exceptions, cancellation included, passed through)."""

    __slots__ = ("_coro", "_waiting")

    def __init__(self, coro: Coroutine[Any, Any, Any], waiting: Any) -> None:
        self._coro, self._waiting = coro, waiting

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, value = self._coro, self._waiting
        while True:
            try:
                try:
                    sent = yield value
                except GeneratorExit:
                    coro.close()
                    raise
                # Cancellation (the timeout's) or anything else thrown in: passed on to the write.
                except BaseException as exc:  # noqa: BLE001
                    value = coro.throw(exc)
                else:
                    value = coro.send(sent)
            except StopIteration as done:
                return done.value


async def _close_quietly(ws: aiohttp.ClientWebSocketResponse) -> None:
    with contextlib.suppress(Exception):
        async with asyncio.timeout(1.0):
            await ws.close()


def _cluster_of(raw: object) -> tuple[str | None, int, bool, str] | None:
    """The answer's ``cluster`` facts, validated (anything malformed is ignored, never trusted)."""
    if not isinstance(raw, dict):
        return None
    leader, leader_id = raw.get("leader"), raw.get("leader_id")
    if leader is not None and not (isinstance(leader, str) and 0 < len(leader) <= codec.MAX_IDENTITY_CHARS):
        return None
    if not isinstance(leader_id, int) or isinstance(leader_id, bool) or not 0 <= leader_id < 1 << 63:
        return None
    name = raw.get("name", "")
    if not isinstance(name, str) or len(name) > codec.MAX_IDENTITY_CHARS:
        return None
    return leader, leader_id, raw.get("data") is True, name
