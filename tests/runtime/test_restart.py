"""The restart loop of ``python -m node`` (node.runtime.restart), with fake Nodes, a fake clock and a fake
wait: fast, and every decision visible.

Before: a node that failed after its start-up completed made the process exit 1, and with the documented
``docker run`` (no restart policy) it stayed down. Now it is built again after a backoff; the exit statuses
of a start-up failure, RESTART_ON_CRASH=off and a stop are what they were, and a stop during the wait exits
0 at once. tests/integration/test_restart_on_crash.py shows it with real processes and a damaged log.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.__main__ import EXIT_FAILED, EXIT_OK, EXIT_USAGE, _report_failure
from node.config import Config
from node.errors import RefusedToRun
from node.runtime.restart import (
    RESTART_FIRST_DELAY_S,
    RESTART_MAX_DELAY_S,
    RESTART_RESET_AFTER_S,
    restart_delay_s,
    run_restarting,
    wait_for_stop,
)

CONFIG = Config(jwt_secret="x" * 32)

# What one fake Node does: fail after its start-up completed ("crash"), fail before ("early": an ordinary
# error; "port": the listening socket, an OSError), stop cleanly on a signal ("clean"), or fail while it
# stops after a signal ("stop_crash"), or refuse what DATA_DIR holds after start-up ("refused": RefusedToRun
# nested in TaskGroups, as the Replicator raises it). "crash_then_signal": fail, then a signal during the wait.
CRASHES = ("crash", "crash_then_signal")
ENDINGS = ("clean", "early", "port", "stop_crash", "refused", "crash_then_signal")


class RecordingLog:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Any:
        return lambda event, **fields: self.lines.append((level, event, fields))

    def events(self, name: str | None = None) -> list[str] | list[dict[str, Any]]:
        if name is None:
            return [event for _, event, _ in self.lines]
        return [fields for _, event, fields in self.lines if event == name]


@dataclass
class Script:
    """The fake world: each Node's behaviour and how long it ran (fake seconds), the clock, what happened."""

    steps: list[tuple[str, float]]
    now_s: float = 0.0
    built: int = 0
    open_nodes: int = 0  # built and not yet released: never more than one
    most_open: int = 0
    pauses: list[float] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    @contextlib.asynccontextmanager
    async def new_node(self) -> AsyncIterator[FakeNode]:
        assert self.built < len(self.steps), "a Node was built after the script ended"
        kind, ran_s = self.steps[self.built]
        self.built += 1
        self.open_nodes += 1
        self.most_open = max(self.most_open, self.open_nodes)
        try:
            yield FakeNode(self, kind, ran_s)
        finally:
            self.open_nodes -= 1

    async def pause(self, stop: asyncio.Event, delay_s: float) -> bool:
        assert self.open_nodes == 0, "the next Node must wait until the failed one is released"
        self.pauses.append(delay_s)
        if self.steps[self.built - 1][0] == "crash_then_signal":
            stop.set()  # SIGTERM during the wait
            return True
        self.now_s += delay_s
        return False


class FakeNode:
    def __init__(self, script: Script, kind: str, ran_s: float) -> None:
        self.script, self.kind, self.ran_s = script, kind, ran_s
        self.started = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        self.script.now_s += self.ran_s
        if self.kind == "early":
            raise RuntimeError("failed before start-up completed")
        if self.kind == "port":
            raise ExceptionGroup("unhandled errors in a TaskGroup", [OSError(98, "address already in use")])
        self.started.set()
        if self.kind == "refused":
            refusal = RefusedToRun("DATA_DIR holds a database written without replication")
            raise ExceptionGroup("unhandled errors in a TaskGroup", [ExceptionGroup("inner", [refusal])])
        if self.kind in CRASHES:
            raise ExceptionGroup("unhandled errors in a TaskGroup", [RuntimeError("log segment is damaged")])
        stop.set()  # a signal; the node stops
        if self.kind == "stop_crash":
            raise RuntimeError("failed while stopping")


async def _run(steps: list[tuple[str, float]], *, restart: bool = True) -> tuple[int, Script, RecordingLog]:
    script, log = Script(steps), RecordingLog()
    code = await run_restarting(
        script.new_node, script.stop, restart=restart,
        report=lambda exc, node: _report_failure(exc, node, CONFIG, log), log=log,
        monotonic=lambda: script.now_s, pause=script.pause,
    )  # fmt: skip
    return code, script, log


def _expected_delays(ran: list[float]) -> list[float]:
    """The documented backoff, written out independently of restart_delay_s: 1 s, doubled after each failed
    run shorter than 60 s, at most 30 s; 1 s again after a run of 60 s or more."""
    delays: list[float] = []
    for ran_s in ran:
        if not delays or ran_s >= 60:
            delays.append(1.0)
        else:
            delays.append(min(delays[-1] * 2, 30.0))
    return delays


# --- regression: each documented behaviour --------------------------------------------------------------


async def test_a_node_that_fails_after_start_up_is_built_again_after_backoff_and_stops_cleanly():
    code, script, log = await _run([("crash", 2.0), ("crash", 3.0), ("crash", 1.0), ("clean", 5.0)])
    assert code == EXIT_OK
    assert script.built == 4 and script.most_open == 1
    assert script.pauses == [1.0, 2.0, 4.0]
    assert log.events() == [
        *["node_crashed", "node_restarting"] * 3,
    ]
    restarts = log.events("node_restarting")
    assert [e["attempt"] for e in restarts] == [1, 2, 3]
    assert [e["delay_s"] for e in restarts] == [1.0, 2.0, 4.0]
    assert [e["ran_s"] for e in restarts] == [2.0, 3.0, 1.0]
    assert "log segment is damaged" in log.events("node_crashed")[0]["error"]


async def test_the_delay_doubles_up_to_30_s_and_is_1_s_again_after_a_run_of_60_s():
    steps = [("crash", 0.5)] * 7 + [("crash", RESTART_RESET_AFTER_S), ("crash", 0.5), ("clean", 1.0)]
    code, script, log = await _run(steps)
    assert code == EXIT_OK
    assert script.pauses == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 1.0, 2.0]
    assert [e["attempt"] for e in log.events("node_restarting")] == [1, 2, 3, 4, 5, 6, 7, 1, 2]


async def test_a_signal_during_the_wait_ends_the_process_with_status_0_and_builds_no_node():
    code, script, log = await _run([("crash", 1.0), ("crash_then_signal", 1.0), ("clean", 1.0)])
    assert code == EXIT_OK
    assert script.built == 2 and script.pauses == [1.0, 2.0]
    assert log.events()[-1] == "node_stopped"


async def test_with_restart_off_a_failure_exits_1_as_before():
    code, script, log = await _run([("crash", 100.0), ("clean", 1.0)], restart=False)
    assert code == EXIT_FAILED
    assert script.built == 1 and script.pauses == []
    assert log.events() == ["node_crashed"]


async def test_a_failure_before_start_up_completed_is_not_restarted():
    code, script, log = await _run([("early", 0.1), ("clean", 1.0)])
    assert code == EXIT_FAILED and script.built == 1 and log.events() == ["node_crashed"]
    # The listening socket (port in use): a start-up failure, exit 2, on a first start and after a restart.
    code, script, log = await _run([("port", 0.1), ("clean", 1.0)])
    assert code == EXIT_USAGE and script.built == 1 and log.events() == ["startup_failed"]
    code, script, log = await _run([("crash", 5.0), ("port", 0.1), ("clean", 1.0)])
    assert code == EXIT_USAGE and script.built == 2
    assert log.events() == ["node_crashed", "node_restarting", "startup_failed"]


async def test_a_refusal_of_what_data_dir_holds_is_not_restarted_even_after_start_up():
    """Data written without replication, another node's hard-state file, a newer log format: found by the
    Replicator after ``started``; a restart would only find it again every 30 s. Exit 1 as before."""
    code, script, log = await _run([("refused", 0.5), ("clean", 1.0)])
    assert code == EXIT_FAILED and script.built == 1 and script.pauses == []
    assert log.events() == ["node_crashed"]
    assert "written without replication" in log.events("node_crashed")[0]["error"]
    code, script, log = await _run([("crash", 3.0), ("refused", 0.5), ("clean", 1.0)])
    assert code == EXIT_FAILED and script.built == 2 and script.pauses == [1.0]


async def test_a_node_that_fails_while_it_stops_is_not_restarted():
    code, script, log = await _run([("stop_crash", 1.0), ("clean", 1.0)])
    assert code == EXIT_FAILED and script.built == 1 and script.pauses == []


async def test_the_real_wait_ends_at_a_stop_and_otherwise_after_the_delay():
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(0.01, stop.set)
    async with asyncio.timeout(10):  # a liveness bound: the wait is 30 s unless the stop ends it
        assert await wait_for_stop(stop, RESTART_MAX_DELAY_S) is True
    assert await wait_for_stop(asyncio.Event(), 0.01) is False


def test_the_figures():
    assert (RESTART_FIRST_DELAY_S, RESTART_MAX_DELAY_S, RESTART_RESET_AFTER_S) == (1.0, 30.0, 60.0)
    assert RESTART_RESET_AFTER_S > RESTART_MAX_DELAY_S
    assert restart_delay_s(None, 0.0) == 1.0 and restart_delay_s(16.0, 59.9) == 30.0
    assert restart_delay_s(30.0, 60.0) == 1.0


# --- properties: any sequence of runs -------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    # Multiples of 1/1024 s: the fake clock's sums and differences are then exact, as a real clock's
    # readings are for the loop (a run of 60 s measured as 59.999... would be a flaw of the fake, not of it).
    crashes=st.lists(st.integers(min_value=0, max_value=200 * 1024).map(lambda k: k / 1024), max_size=15),
    ending=st.sampled_from(ENDINGS),
    restart=st.booleans(),
)
def test_any_sequence_of_failures_gives_the_documented_backoff_and_exit_status(crashes, ending, restart):
    steps = [("crash", ran_s) for ran_s in crashes] + [(ending, 1.0)]
    code, script, log = asyncio.run(_run(steps, restart=restart))
    assert script.most_open == 1 and script.open_nodes == 0  # one Node at a time, each released
    if not restart:
        assert script.built == 1 and script.pauses == []
        first = steps[0][0]
        expected = {"clean": EXIT_OK, "port": EXIT_USAGE}.get(first, EXIT_FAILED)
        assert code == expected
        return
    ran = [ran_s for _, ran_s in steps]
    if ending == "crash_then_signal":
        assert code == EXIT_OK and script.built == len(steps)
        assert script.pauses == _expected_delays(ran)
    else:
        assert script.built == len(steps)
        assert script.pauses == _expected_delays(ran[:-1])
        assert code == {"clean": EXIT_OK, "port": EXIT_USAGE}.get(ending, EXIT_FAILED)
    assert all(RESTART_FIRST_DELAY_S <= d <= RESTART_MAX_DELAY_S for d in script.pauses)
    restarts = log.events("node_restarting")
    assert [e["delay_s"] for e in restarts] == script.pauses
    for before, after, ran_s in zip(restarts, restarts[1:], ran[1:], strict=False):
        # The attempt counts failures in a row: 1 again exactly when the delay went back to 1 s.
        if ran_s >= RESTART_RESET_AFTER_S:
            assert after["attempt"] == 1 and after["delay_s"] == RESTART_FIRST_DELAY_S
        else:
            assert after["attempt"] == before["attempt"] + 1
    # Every failure is logged before its restart, each restart after its failure.
    events = [e for e in log.events() if e in ("node_crashed", "node_restarting")]
    assert events[: 2 * len(restarts)] == ["node_crashed", "node_restarting"] * len(restarts)


@settings(max_examples=500, deadline=None)
@given(
    previous=st.one_of(st.none(), st.sampled_from([1.0, 2.0, 4.0, 8.0, 16.0, 30.0])),
    ran_s=st.floats(min_value=0.0, max_value=1e6, allow_nan=False),
)
def test_the_delay_is_always_within_bounds_and_never_shrinks_within_a_loop(previous, ran_s):
    delay = restart_delay_s(previous, ran_s)
    assert RESTART_FIRST_DELAY_S <= delay <= RESTART_MAX_DELAY_S
    if previous is None or ran_s >= RESTART_RESET_AFTER_S:
        assert delay == RESTART_FIRST_DELAY_S
    else:
        assert delay >= previous and (delay == RESTART_MAX_DELAY_S or delay == 2 * previous)


@pytest.mark.parametrize("raw", ["on", " ON ", "off", "Off"])
def test_restart_on_crash_reads_on_or_off(raw):
    config = Config.from_env({"JWT_SECRET": "x" * 32, "RESTART_ON_CRASH": raw})
    assert config.restart_on_crash is (raw.strip().lower() == "on")
