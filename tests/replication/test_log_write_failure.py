"""A follower whose log write fails (disk full) acknowledges nothing it does not hold, keeps running, and
is whole again from its disk once writes work.

The defect: any failed log write raised out of the Replicator and the node exited; on a full disk the
restarted node failed again at its next append, and so on. Now a clean failure (the log undid it) drops
everything of that Ready and of every Ready queued after it (their acks would claim entries the disk does
not hold), /readyz says why, and the core is rebuilt from what is durable, as at a restart, in process.
The real Replicator, its real durable log on disk, and the real core; only fdatasync fails and the network
is a recorder.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
from collections.abc import AsyncIterator

from node.actors import replicator as replicator_module
from node.actors.replicator import Replicator
from node.core.ids import Endpoint
from node.core.replication import machine
from node.core.replication import messages as msg
from node.runtime import logging as nodelog
from node.runtime.mailbox import LatestCell
from node.storage import corestate
from node.storage import log as logmod
from node.storage.asynclog import AsyncLog
from node.storage.log import DurableLog

LEADER = Endpoint.parse("127.0.0.3:4001")
VOTERS = frozenset({"me", "leader", "other"})
_REAL_FDATASYNC = os.fdatasync


class Recorder:
    def __init__(self) -> None:
        self.sent: list[tuple[Endpoint, msg.Message]] = []

    def send(self, endpoint: Endpoint, message: msg.Message, cluster: str = "") -> None:
        self.sent.append((endpoint, message))

    def acks(self) -> list[msg.AppendAck]:
        return [m for _, m in self.sent if isinstance(m, msg.AppendAck)]


class NoDatabase:
    is_open = True

    async def applied_index(self) -> int:
        return 0

    async def _write(self, fn) -> int:  # the "does the database hold tables" check: it holds none
        return 0


class FailingSync:
    """The next ``fail`` fdatasync calls fail with ENOSPC; the log's undo (cut the suffix, sync) then works,
    as on a real full disk where cutting frees the space."""

    def __init__(self) -> None:
        self.fail = 0
        self.failed = 0

    def __call__(self, fd: int) -> None:
        if self.fail:
            self.fail -= 1
            self.failed += 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        _REAL_FDATASYNC(fd)


@contextlib.asynccontextmanager
async def follower(tmp_path) -> AsyncIterator[tuple[Replicator, Recorder, asyncio.Task]]:
    """The real Replicator as member "me" of a bootstrapped 3-voter cluster "c" (its log on disk, its
    completer running), sending into a Recorder; the completer and the log are closed afterwards."""
    r = Replicator(
        me=Endpoint.parse("127.0.0.2:4001"), data_dir=tmp_path, database=NoDatabase(), views=LatestCell(),
        secret="s" * 32, formation_window_s=0, log=nodelog.get_logger(),
    )  # fmt: skip
    r.identity = "me"
    r.identities = {LEADER: "leader"}
    r.transport = net = Recorder()
    r._asynclog = AsyncLog(lambda: DurableLog.open(tmp_path / "log"))
    await r._asynclog.start()
    completer = asyncio.create_task(r._completer())
    try:
        r.state, ready = machine.bootstrap("me", VOTERS, r.options, "c")
        await r._carry_out([ready])
        await r._drain()
        yield r, net, completer
    finally:
        completer.cancel()
        await asyncio.gather(completer, return_exceptions=True)
        await r._asynclog.close()


async def carry(r: Replicator, inp: msg.Input) -> None:
    """Step one input and carry its Ready out to the end (a hang would be a defect: fail, do not wait)."""
    assert r.state is not None
    r.state, ready = machine.step(r.state, inp, 1.0)
    async with asyncio.timeout(10):
        await r._carry_out([ready])
        await r._drain()


def append(epoch: int, prev: msg.LogId, first: int, count: int, commit: int, seq: int) -> msg.Receive:
    entries = tuple(msg.Entry(epoch, i, msg.Kind.COMMAND, b"x%d" % i) for i in range(first, first + count))
    return msg.Receive("leader", msg.Append(epoch, prev, entries, commit, seq), "c")


async def test_a_follower_whose_log_write_fails_acks_nothing_and_resyncs_from_its_disk(tmp_path, monkeypatch):
    monkeypatch.setattr(replicator_module, "LOG_FAILURE_BACKOFF_S", 0.0)
    sync = FailingSync()
    monkeypatch.setattr(logmod.os, "fdatasync", sync)
    async with follower(tmp_path) as (r, net, completer):
        stop = asyncio.Event()

        async def step(inp: msg.Input) -> None:
            await carry(r, inp)

        # Entries 2-3 arrive while the disk is full: no ack, the node is not ready, and it does not exit.
        sync.fail = 1
        await step(append(1, msg.LogId(0, 1), 2, 2, 1, seq=1))
        assert sync.failed >= 1 and not completer.done()
        assert net.acks() == []
        assert r._log_failure is not None and "disk full" in (r.log_write_problem or "")
        # Another Append queued behind the failure (it would follow entries that are not there): no ack.
        await step(append(1, msg.LogId(1, 3), 4, 1, 1, seq=2))
        assert net.acks() == [] and not completer.done()

        # The rebuild: the core is what the disk holds (entry 1), nothing more.
        async with asyncio.timeout(10):
            await r._resync(stop)
        assert r._log_failure is None and r.state is not None
        assert r.state.last.index == r._asynclog.last[1] == 1

        # Space is back: the leader's resend is taken and acknowledged, and /readyz's reason is gone.
        assert sync.fail == 0
        await step(append(1, msg.LogId(0, 1), 2, 3, 1, seq=3))
        assert [a.match for a in net.acks()] == [4]
        assert r.log_write_problem is None
        assert [e.index for e in await r._asynclog.read(1, 1 << 20)] == [1, 2, 3, 4]


async def test_a_failure_that_leaves_the_log_in_doubt_still_stops_the_node(tmp_path):
    """The control: anything but a clean failure (here a hard-state write that failed) is not resynced
    in process; it propagates, and the node restarts from its disk."""
    r = Replicator(
        me=Endpoint.parse("127.0.0.2:4001"), data_dir=tmp_path, database=NoDatabase(), views=LatestCell(),
        secret="s" * 32, formation_window_s=0, log=nodelog.get_logger(),
    )  # fmt: skip
    assert r._recoverable(logmod.LogDiskFull("full")) and r._recoverable(logmod.LogIOError("eio"))
    assert not r._recoverable(logmod.LogFailed("in doubt")) and not r._recoverable(OSError("hard state"))
    assert not r._recoverable(ValueError("does not follow"))  # only behind a clean failure
    assert r._recoverable(OSError(errno.ENOSPC, "hard state: no space"))  # a clean one: the old file stays
    r._log_failure = logmod.LogDiskFull("full")
    assert r._recoverable(ValueError("does not follow"))


async def test_a_hard_state_write_on_a_full_disk_sends_nothing_and_resyncs(tmp_path, monkeypatch):
    """Regression: a full disk failing the hard-state write (a new epoch adopted from a leader) made the
    node exit, and a node started again on the same full disk failed the same way. Now nothing of that
    Ready is sent (no ack of an epoch the disk does not hold), the state is rebuilt from the disk, and the
    same heartbeat is answered once space returns."""
    monkeypatch.setattr(replicator_module, "LOG_FAILURE_BACKOFF_S", 0.0)
    real_save = corestate.save_core_hard_state
    full = {"on": False}

    def save(directory, hard, identity):
        if full["on"]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(directory, hard, identity)

    monkeypatch.setattr(corestate, "save_core_hard_state", save)
    async with follower(tmp_path) as (r, net, completer):
        stop = asyncio.Event()

        async def step(inp: msg.Input) -> None:
            await carry(r, inp)

        beat = msg.Receive("leader", msg.Heartbeat(5, 1, 1), "c")
        full["on"] = True
        await step(beat)
        assert net.sent == [] and not completer.done()
        assert r._log_failure is not None
        async with asyncio.timeout(10):
            await r._resync(stop)
        assert r.state is not None and r.state.hard.epoch == 0  # what the disk holds
        full["on"] = False
        await step(beat)
        assert [type(m).__name__ for _, m in net.sent] == ["HeartbeatAck"]
        assert r.state.hard.epoch == 5
