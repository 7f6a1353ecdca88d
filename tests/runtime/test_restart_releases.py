"""A Node that fails gives back everything it holds before the next one starts, crash after crash.

In-process, a real replicated Node (HTTP on loopback, its database, its log, DATA_DIR) run by the real restart
loop (node.runtime.restart) with the real Node factory's ingredients; only the failure is injected, by the
test: a Replicator task raises LogCorrupt (what a damaged record read from the disk raises there; the
integration test tests/integration/test_restart_on_crash.py damages a real record instead). At each wait
before a restart, so after the failed Node's ``run`` has returned, the test checks what the next Node will
need: the DATA_DIR lock can be taken (flock: not even this process could take it twice), the port can be
bound, the threads of the database and the log have ended, and the process's file descriptors are back to
what they were before the first Node. Over CRASHES failures, and the data written by each run is still
there in the last one.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import socket
import threading
import time
import weakref
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from node import auth
from node.actors.replicator import Replicator
from node.config import Config
from node.core.ids import Endpoint
from node.runtime.clock import LoopClock
from node.runtime.restart import run_restarting
from node.runtime.transport import HttpTransport
from node.storage.dirlock import lock_data_dir
from node.storage.log import LogCorrupt
from node.supervisor import Node
from tests.support.fakes import StaticResolver
from tests.support.wait import until

CRASHES = 5
SECRET = "restart-releases-secret-0123456789abcdef"
# Threads a Node owns (node.storage.sqlite connection threads, node.storage.asynclog): none may outlive it.
NODE_THREADS = ("sqlite-writer", "sqlite-reader-", "durable-log")
READY_BOUND_S = 30.0  # liveness bounds, never speed assertions
RELEASE_BOUND_S = 10.0


class QuietLog:
    """Collects events (the Node's logger interface); ``bind`` returns itself."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, dict[str, Any]]] = []

    def bind(self, **_: Any) -> QuietLog:
        return self

    def __getattr__(self, level: str) -> Any:
        return lambda event, **fields: self.lines.append((event, fields))

    def events(self, name: str) -> list[dict[str, Any]]:
        return [fields for event, fields in self.lines if event == name]


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _node_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(NODE_THREADS)]


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _lock_free(data_dir: Path) -> bool:
    try:
        lock = lock_data_dir(data_dir, create=False)
    except OSError:
        return False
    lock.release()
    return True


async def test_threads_and_file_descriptors_stay_bounded_over_several_crashes(tmp_path, monkeypatch):
    host = "127.0.0.1"
    port = _free_port(host)
    data_dir = tmp_path / "data"
    config = Config(
        host=host, port=port, advertise_address=host, data_dir=data_dir, jwt_secret=SECRET,
        formation_window_s=0.0, service_name="restart-test", discovery_interval_s=1.0,
    )  # fmt: skip
    me = Endpoint(host, port)
    log = QuietLog()
    resolver = StaticResolver({config.service_name: [host]})
    refs: list[weakref.ref[Node]] = []  # every Node built, not kept alive by the test
    crash = asyncio.Event()

    original = Replicator._watch_views

    async def watch_views_until_the_crash(self: Replicator) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(original(self))
            await crash.wait()
            raise LogCorrupt(data_dir / "log" / "00000000000000000001.seg", 64, "checksum mismatch")

    monkeypatch.setattr(Replicator, "_watch_views", watch_views_until_the_crash)

    @contextlib.asynccontextmanager
    async def new_node() -> AsyncIterator[Node]:
        # As node.__main__._serve builds them: a peer transport of its own for each Node.
        async with HttpTransport(secret=SECRET, probe_timeout_s=config.probe_timeout_s) as transport:
            node = Node(config, me=me, clock=LoopClock(), resolver=resolver, transport=transport, log=log)
            refs.append(weakref.ref(node))
            yield node

    base_fds = _fds()
    base_threads = threading.active_count()
    measured: list[dict[str, int]] = []

    async def released_then_go_on(stop: asyncio.Event, delay_s: float) -> bool:
        """In place of the backoff: check that the failed Node let go of everything, then restart at once."""
        assert _lock_free(data_dir), "the failed Node still holds the DATA_DIR lock"
        assert _port_free(host, port), "the failed Node still listens"
        await until(lambda: not _node_threads(), "the failed Node's threads to end", RELEASE_BOUND_S, 0.01)
        await until(lambda: _fds() <= base_fds, f"file descriptors back to {base_fds}", RELEASE_BOUND_S, 0.01)
        measured.append({"fds": _fds(), "threads": threading.active_count(), "delay_s": int(delay_s)})
        crash.clear()
        return False

    stop = asyncio.Event()
    runner = asyncio.create_task(
        run_restarting(
            new_node,
            stop,
            restart=True,
            log=log,
            pause=released_then_go_on,
            report=lambda exc, node: 1,
        )  # fmt: skip
    )
    token = auth.mint_jwt(SECRET, auth.Role.ADMIN, now=time.time(), ttl_s=600)
    headers = {"Authorization": f"Bearer {token}"}
    url = f"http://{host}:{port}"

    async def write(session: aiohttp.ClientSession, statements: list[list[Any]]) -> dict[str, Any]:
        async with session.post(f"{url}/db/execute", json=statements, headers=headers) as resp:
            body = await resp.json()
            assert resp.status == 200, body
            return body

    def writable(i: int) -> bool:
        node = refs[i]() if len(refs) > i else None
        if node is None or node.replication is None:
            return False
        status = node.replication.replicator.status()
        return status is not None and status.writable

    try:
        for i in range(CRASHES + 1):
            await until(lambda i=i: writable(i), f"node {i} to take writes", READY_BOUND_S, 0.02)
            async with aiohttp.ClientSession() as session:
                if i == 0:
                    await write(session, [["CREATE TABLE t (v INTEGER)"]])
                await write(session, [["INSERT INTO t(v) VALUES(?)", i]])
            if i == CRASHES:
                break
            crash.set()
            await until(
                lambda i=i: len(measured) == i + 1, f"crash {i + 1} to be released", READY_BOUND_S, 0.01
            )
        async with aiohttp.ClientSession() as session:
            async with session.post(
                f"{url}/db/query", json=[["SELECT v FROM t ORDER BY v"]], headers=headers
            ) as resp:
                body = await resp.json()
        assert [row[0] for row in body["results"][0]["values"]] == list(range(CRASHES + 1))
        stop.set()
        async with asyncio.timeout(READY_BOUND_S):
            assert await runner == 0
    finally:
        stop.set()
        crash.set()
        if not runner.done():
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)

    assert len(refs) == CRASHES + 1 and len(log.events("node_restarting")) == CRASHES
    assert len(measured) == CRASHES
    # Bounded: after every crash the descriptors are back to the baseline (waited for above), and the
    # threads beyond the baseline are at most asyncio's default executor, which is shared and capped.
    executor_cap = min(32, (os.cpu_count() or 1) + 4)
    assert all(m["fds"] <= base_fds for m in measured), measured
    assert all(m["threads"] <= base_threads + executor_cap for m in measured), (base_threads, measured)
    # (The connection threads end just after their close job: Database.close does not join them.)
    await until(lambda: not _node_threads(), "the last Node's threads to end", RELEASE_BOUND_S, 0.01)
    # And nothing refers to a Node once its run is over (no registry, task, callback or cache keeps it:
    # aiohttp's middleware cache did, see node.http.server._forget_middleware_chains): its memory is given
    # back too.
    gc.collect()
    assert [i for i, ref in enumerate(refs) if ref() is not None] == []
