"""bench/write_timeline.py: the figures from marks and dumps, and the shims installed in a real process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bench import write_timeline as wt
from tests.support.wait import wait_until

REPO = Path(__file__).resolve().parents[1]


def test_stage_durations_follow_the_marks_and_leave_unknown_stages_out():
    marks = {"read": 1.0, "submitted": 1.5, "sent": 2.0, "acked": 4.0, "committed": 4.25, "applying": 5.0,
             "applied": 6.0, "resumed": 6.5, "written": 7.0}  # fmt: skip
    assert wt.stage_durations(marks) == [0.5, 0.5, 2.0, 0.25, 0.75, 1.0, 0.5, 0.5]
    del marks["acked"]  # no ack seen for it (a cluster of one): both stages around it are unknown
    assert wt.stage_durations(marks) == [0.5, 0.5, None, None, 0.75, 1.0, 0.5, 0.5]
    assert len(wt.stage_durations(marks)) == len(wt.STAGES)


def test_summarize_gives_count_mean_and_percentiles_in_milliseconds():
    got = wt.summarize({"a": [0.001 * v for v in range(1, 101)], "empty": [], "b": [None, 0.002]})
    assert got["a"]["n"] == 100
    assert got["a"]["mean_ms"] == pytest.approx(50.5)
    assert got["a"]["p50_ms"] == pytest.approx(51)
    assert got["a"]["p90_ms"] == pytest.approx(91)
    assert "empty" not in got
    assert got["b"] == {"n": 1, "mean_ms": 2.0, "p50_ms": 2.0, "p90_ms": 2.0}


def test_merge_keeps_only_rows_of_the_measured_period():
    dump = {
        "writes": [[9.0, [0.1] * len(wt.STAGES)], [11.0, [0.2, None, *[0.3] * (len(wt.STAGES) - 2)]]],
        wt.TURNAROUND: [[9.5, 0.4], [10.0, 0.5]],
        wt.FOLLOWER: [[12.0, 0.6]],
    }
    columns = wt.merge([dump, {}], since=10.0)
    assert columns[wt.STAGES[0]] == [0.2]
    assert columns[wt.STAGES[1]] == []  # None is unknown, never zero
    assert columns[wt.STAGES[-1]] == [0.3]
    assert columns[wt.TURNAROUND] == [0.5]
    assert columns[wt.FOLLOWER] == [0.6]


def test_the_table_names_every_stage_with_figures_and_their_shares():
    summary = {name: {"n": 10, "mean_ms": 1.0, "p50_ms": 1.0, "p90_ms": 2.0} for name in wt.STAGES[:4]}
    summary[wt.TURNAROUND] = {"n": 9, "mean_ms": 5.0, "p50_ms": 4.0, "p90_ms": 9.0}
    table = wt.format_table(summary, "title")
    lines = table.splitlines()
    assert lines[0] == "title"
    for name in wt.STAGES[:4]:
        (line,) = [line for line in lines if line.strip().startswith(name)]
        assert line.endswith("25%")  # four equal stages
    assert not any(line.strip().startswith(wt.STAGES[5]) for line in lines)
    assert lines[-1].split()[-1] == "4.00"  # the sum of the stage means, the turn-around left out


def test_read_dumps_reads_every_line_and_skips_one_being_written(tmp_path):
    (tmp_path / "1.jsonl").write_text(
        json.dumps({"pid": 1, "n": 1}) + "\n" + json.dumps({"pid": 1, "n": 2}) + "\n"
    )
    (tmp_path / "2.jsonl").write_text(
        json.dumps({"pid": 2}) + '\n{"pid": 2, "wri'
    )  # the last one half written
    (tmp_path / "3.json").write_text(json.dumps({"pid": 3}))  # not a dump
    assert wt.read_dumps(tmp_path) == [{"pid": 1, "n": 1}, {"pid": 1, "n": 2}, {"pid": 2}]


def test_every_hooked_method_exists():
    """A renamed method must fail the install, not silently measure nothing: the hooks are looked up first."""
    for module, cls, method in wt.HOOKS:
        owner, original = wt._lookup(module, cls, method)
        assert callable(original), (module, cls, method)
    with pytest.raises(RuntimeError, match="is gone"):
        wt._lookup("node.actors.replicator", "Replicator", "no_such_method")


def test_the_sitecustomize_installs_the_shims_in_a_node_process_and_dumps(tmp_path):
    hooks, dumps = tmp_path / "hooks", tmp_path / "dumps"
    hooks.mkdir()
    dumps.mkdir()
    (hooks / "sitecustomize.py").write_text(wt.sitecustomize_source(REPO))
    script = textwrap.dedent(
        """
        import sys, time
        from bench import write_timeline
        from node.actors.replicator import Replicator
        from node.http.server import GuardedRequestHandler
        print(Replicator.submit.__qualname__, GuardedRequestHandler._fast_write.__qualname__)
        sys.stdout.flush()
        with write_timeline.RECORDER.lock:
            write_timeline.RECORDER.follower.append((123.0, 0.004))
        time.sleep(30)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(hooks), "TN_TIMELINE_DIR": str(dumps)}
    proc = subprocess.Popen(
        [sys.executable, "-c", script], env=env, cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.split() == [
            "install.<locals>.submit.<locals>.wrapped",
            "install.<locals>.fast_write.<locals>.wrapped",
        ]
        # The dump thread appends what was recorded since its last dump: here the one row the child added.
        wait_until(lambda: wt.read_dumps(dumps), 10, what="the first dump")
        assert wt.read_dumps(dumps) == [
            {"pid": proc.pid, "writes": [], wt.TURNAROUND: [], wt.FOLLOWER: [[123.0, 0.004]]}
        ]
    finally:
        proc.kill()
        proc.wait(timeout=10)
