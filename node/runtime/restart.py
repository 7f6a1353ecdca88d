"""Restarting a failed node in the same process (RESTART_ON_CRASH=on, the default).

Why in the process: the documented way to run the cluster is a plain ``docker run`` without a restart
policy, so a node that exits after a failure none of its actors handles (a log record found damaged while
the Replicator reads it to send entries to a follower, a hard-state or identity file that fails its check)
stays down for good, although its next start would quarantine the damaged state and rejoin the cluster by
itself (node.replication.startup). :func:`run_restarting` builds a fresh Node after such a failure and runs
it again, so that start-up's integrity checks and quarantine do their job without an operator.

Only once everything the failed Node held is released: ``Node.run`` returns (raises) after its TaskGroup has
ended every task, HTTP has stopped listening, the database and the log are closed (their threads end with
their last job), and the DATA_DIR lock is given back; the peer transport the factory opened is closed when
its context ends. The next Node starts only then.

The backoff between a failure and the next start:

* ``RESTART_FIRST_DELAY_S`` (1 s): a one-off failure (a damaged record, quarantined at the next start)
  costs about a second plus the start-up. The second is longer than the peers' failure detection with the
  defaults (3 missed probes 0.25 s apart: about 0.75 s against a closed port), so they see the node go and
  take the restarted one as a new start (a higher incarnation), as they would after a container restart.
* doubled after each failure up to ``RESTART_MAX_DELAY_S`` (30 s): a failure that comes back at every start
  (a disk that keeps failing, a bug) costs at most one start-up (its integrity check reads the whole
  database and log: about 1 s/GB) every 30 s, not a loop that takes the disk and the CPU from the peers and
  fills the log with tracebacks; and once its cause is gone (a disk freed, a file restored) the node is
  back within 30 s, the same order as NODE_TIMEOUT (30 s), after which its peers had dropped it anyway.
* back to 1 s once a run lasted ``RESTART_RESET_AFTER_S`` (60 s): twice the longest delay, and far longer
  than a start-up that fails again at once, so a run that long served and its failure is a new incident, not
  the same loop; the consecutive-failure ``attempt`` starts again at 1 too.

Only a node whose start-up completed (``node.started``) is restarted: a start-up failure (the port in use,
DATA_DIR unusable or held by another process) exits as before, since a restart would not fix it; so does a
failure that is a refusal of what DATA_DIR holds (:class:`node.errors.RefusedToRun`: data written without
replication, another node's hard-state file, a log in a newer format), found by the Replicator after
``started``, which a restart would only repeat every 30 s while the process looked alive. A
SIGTERM/SIGINT during the wait ends the process at once with status 0; one that came before the failure
(a node that failed while it stopped) is not restarted either and exits with the failure's status.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

from node.errors import RefusedToRun

RESTART_FIRST_DELAY_S = 1.0
RESTART_MAX_DELAY_S = 30.0
RESTART_RESET_AFTER_S = 60.0
EXIT_OK = 0  # the process's status after a clean stop (node.__main__.EXIT_OK)


class RunnableNode(Protocol):
    """What the loop needs of a Node (node.supervisor.Node; a fake in the tests)."""

    started: asyncio.Event

    async def run(self, stop: asyncio.Event) -> None: ...


def restart_delay_s(previous_s: float | None, ran_s: float) -> float:
    """Seconds to wait before the next start, after a run of ``ran_s`` seconds that failed; ``previous_s`` is
    the delay before that run (None: it was the first)."""
    if previous_s is None or ran_s >= RESTART_RESET_AFTER_S:
        return RESTART_FIRST_DELAY_S
    return min(previous_s * 2, RESTART_MAX_DELAY_S)


async def wait_for_stop(stop: asyncio.Event, delay_s: float) -> bool:
    """Wait ``delay_s`` seconds, or less if ``stop`` is set meanwhile; True if it was."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(delay_s):
            await stop.wait()
    return stop.is_set()


async def _run_once(
    new_node: Callable[[], AbstractAsyncContextManager[RunnableNode]],
    stop: asyncio.Event,
    report: Callable[[Exception, RunnableNode], int],
) -> tuple[int | None, bool]:
    """One Node's life: (None, False) after a clean stop, else (the failure's exit status, whether a restart
    may help: its start-up had completed and it is no refusal of what DATA_DIR holds). Only this frame refers
    to the Node, so nothing of it outlives its run (the wait after a failure holds neither the Node nor the
    exception's traceback)."""
    async with new_node() as node:
        try:
            await node.run(stop)
        except Exception as exc:  # noqa: BLE001 - the node failed: report it, the caller decides what next
            return report(exc, node), node.started.is_set() and not _refusal(exc)
    return None, False


def _refusal(exc: Exception) -> bool:
    """Whether ``exc``, or any exception in it (TaskGroups nest them), is a RefusedToRun."""
    if isinstance(exc, BaseExceptionGroup):
        return exc.subgroup(lambda e: isinstance(e, RefusedToRun)) is not None
    return isinstance(exc, RefusedToRun)


async def run_restarting(
    new_node: Callable[[], AbstractAsyncContextManager[RunnableNode]],
    stop: asyncio.Event,
    *,
    restart: bool,
    report: Callable[[Exception, RunnableNode], int],
    log: Any,
    monotonic: Callable[[], float] = time.monotonic,
    pause: Callable[[asyncio.Event, float], Awaitable[bool]] = wait_for_stop,
) -> int:
    """Run a Node from ``new_node()`` until ``stop``; after a failure ``report`` logs it (``node_crashed``)
    and says the exit status, then (``restart``, start-up completed, no refusal, no stop yet)
    ``node_restarting`` is logged and, after the backoff (``pause``, which returns True if ``stop`` came
    meanwhile), a fresh Node runs. Returns the process's exit status.

    Not bounded in count, on purpose: a node restarts as often as it fails, at most once every
    RESTART_MAX_DELAY_S once failures repeat; a stop ends the loop within one backoff or one Node's stop.
    """
    delay_s: float | None = None
    attempt = 0
    while True:
        began = monotonic()
        code, may_help = await _run_once(new_node, stop, report)
        if code is None:
            return EXIT_OK
        if not restart or not may_help or stop.is_set():
            return code
        ran_s = monotonic() - began
        reset = delay_s is None or ran_s >= RESTART_RESET_AFTER_S
        delay_s = restart_delay_s(delay_s, ran_s)
        attempt = 1 if reset else attempt + 1
        log.warning("node_restarting", attempt=attempt, delay_s=delay_s, ran_s=round(ran_s, 3))
        if await pause(stop, delay_s):
            log.info("node_stopped", reason="signal while waiting to restart")
            return EXIT_OK
