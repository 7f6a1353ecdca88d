"""Smoke test of bench/cluster_bench.py's pure parts: arguments, statistics, ratios, musts and the table.

No process is started and nothing is timed: the benchmark itself is run by hand (bench/README.md). These
tests keep the arithmetic and the verdicts honest, since a wrong percentile or an inverted ratio would make
every figure the benchmark prints misleading.
"""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

_PATH = Path(__file__).resolve().parents[1] / "bench" / "cluster_bench.py"
_spec = importlib.util.spec_from_file_location("cluster_bench", _PATH)
assert _spec is not None and _spec.loader is not None
cb = importlib.util.module_from_spec(_spec)
sys.modules["cluster_bench"] = cb  # dataclasses resolve their module by name
_spec.loader.exec_module(cb)


# --- arguments ----------------------------------------------------------------------------------------------


def test_defaults_match_the_issue():
    args = cb.parse_args([])
    assert args.clients == (1, 32)
    assert args.seconds == 5.0
    assert args.warmup > 0
    assert args.trials == 3
    assert args.require_etcd is False


def test_arguments_are_parsed():
    args = cb.parse_args(["--clients", "1, 8,32,8", "--seconds", "2", "--trials", "5", "--require-etcd"])
    assert args.clients == (1, 8, 32)
    assert args.seconds == 2.0
    assert args.trials == 5
    assert args.require_etcd is True


@pytest.mark.parametrize(
    "argv",
    [
        ["--clients", "0"],
        ["--clients", ""],
        ["--clients", "a"],
        ["--seconds", "0"],
        ["--seconds", "-1"],
        ["--trials", "-1"],
        ["--max-requests", "0"],
        ["--require-etcd", "--skip-etcd"],
        ["--rounds", "0"],
        ["--rounds", "21"],
    ],
)
def test_bad_arguments_are_refused(argv):
    with pytest.raises(SystemExit) as exc:
        cb.parse_args(argv)
    assert exc.value.code == 2


def test_missing_etcd_with_require_etcd_is_an_error_before_anything_starts(tmp_path, capsys):
    args = cb.parse_args(
        ["--require-etcd", "--etcd-bin", str(tmp_path / "no-such-etcd"), "--json", str(tmp_path / "x.json")]
    )
    assert asyncio.run(cb.amain(args)) == 2
    assert "not found" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


# --- statistics ---------------------------------------------------------------------------------------------


def test_percentile_nearest_rank():
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert cb.percentile(values, 50) == 50.0
    assert cb.percentile(values, 99) == 99.0
    assert cb.percentile(values, 100) == 100.0
    assert cb.percentile(values, 0) == 1.0
    assert cb.percentile([7.0], 99) == 7.0
    assert cb.percentile([], 50) is None
    with pytest.raises(ValueError):
        cb.percentile(values, 101)


@given(
    st.lists(st.floats(0, 1e6, allow_nan=False), min_size=1, max_size=300),
    st.floats(0, 100),
    st.floats(0, 100),
)
def test_percentile_is_a_sample_and_monotonic(values, q1, q2):
    s = sorted(values)
    lo, hi = sorted((q1, q2))
    p_lo, p_hi = cb.percentile(s, lo), cb.percentile(s, hi)
    assert p_lo in s and p_hi in s
    assert p_lo <= p_hi
    # nearest rank: at least q% of the samples are <= the percentile
    assert sum(1 for v in s if v <= p_hi) >= math.ceil(hi / 100 * len(s))


def test_summarize():
    stats = cb.summarize([0.002, 0.001, 0.003, 0.004], errors=2, elapsed_s=2.0)
    assert stats.ok == 4
    assert stats.errors == 2
    assert stats.writes_per_s == 2.0
    assert stats.p50_ms == pytest.approx(2.0)
    assert stats.p99_ms == pytest.approx(4.0)
    empty = cb.summarize([], errors=3, elapsed_s=1.0)
    assert (empty.ok, empty.writes_per_s, empty.p50_ms, empty.p99_ms) == (0, 0.0, None, None)
    assert cb.summarize([0.1], errors=0, elapsed_s=0.0).writes_per_s == 0.0


def test_ratio_and_median():
    assert cb.ratio(300.0, 150.0) == 2.0
    assert cb.ratio(None, 1.0) is None
    assert cb.ratio(1.0, None) is None
    assert cb.ratio(1.0, 0.0) is None
    assert cb.median([3.0, 1.0, 2.0]) == 2.0
    assert cb.median([4.0, 1.0]) == 2.5
    assert cb.median([]) is None


def test_count_changes_skips_missing_answers():
    assert cb.count_changes([]) == 0
    assert cb.count_changes([(4, 1), (4, 1), None, (4, 1)]) == 0
    assert cb.count_changes([(4, 1), None, (3, 2), (3, 2), (4, 3)]) == 2
    assert cb.count_changes([None, None]) == 0


@given(st.lists(st.one_of(st.none(), st.integers(0, 3)), max_size=50))
def test_count_changes_counts_transitions_between_answers(observations):
    answered = [o for o in observations if o is not None]
    expected = sum(1 for a, b in zip(answered, answered[1:], strict=False) if a != b)
    assert cb.count_changes(observations) == expected


# --- request bodies and answers ---------------------------------------------------------------------------


@given(st.integers(0, 1023), st.integers(0, 10**9))
def test_payload_has_the_row_size(client, n):
    p = cb.payload_for(client, n)
    assert len(p.encode()) == cb.ROW_PAYLOAD_BYTES


def test_etcd_put_body_is_base64():
    doc = json.loads(cb.etcd_put_body(b"bench/1/2", b"v" * 100))
    assert base64.b64decode(doc["key"]) == b"bench/1/2"
    assert base64.b64decode(doc["value"]) == b"v" * 100


def test_tn_insert_body_is_one_parameterised_statement():
    doc = json.loads(cb.tn_insert_body(3, 4, "p"))
    assert doc == [["INSERT INTO bench(client, n, payload) VALUES(?, ?, ?)", 3, 4, "p"]]


def test_answers_are_judged():
    assert cb.tn_ok(200, {"results": [{"last_insert_id": 1, "rows_affected": 1}]})
    assert not cb.tn_ok(200, {"results": [{"error": "no such table: bench"}]})
    assert not cb.tn_ok(503, {"error": "no quorum", "code": "no_quorum"})
    assert not cb.tn_ok(200, None)
    assert cb.etcd_ok(200, {"header": {"revision": "2"}})
    assert not cb.etcd_ok(200, {"error": "etcdserver: request timed out", "code": 14})
    assert not cb.etcd_ok(503, {"header": {}})


def test_initial_cluster_and_replication_detection():
    assert (
        cb.etcd_initial_cluster([("e0", "http://a:1"), ("e1", "http://b:1")]) == "e0=http://a:1,e1=http://b:1"
    )
    assert not cb.is_replicated({"leader_id": 4, "epoch": 1})
    assert cb.is_replicated({"leader_id": 4, "epoch": 1, "commit_index": 0})
    assert not cb.is_replicated(None)


def _status(leader: object, epoch: object, voters: int, size: int = 3) -> dict:
    nodes = [{"id": i, "voter": i < voters} for i in range(size)]
    return {"leader_id": leader, "epoch": epoch, "nodes": nodes}


def test_settled_needs_one_view_and_every_voter():
    """The phases start only once formation is over (a learner's promotion changes what members report)."""
    assert cb.settled([_status(4, 1, 3)] * 3, 3)
    assert not cb.settled([_status(4, 1, 3)] * 2, 3)  # a member missing
    assert not cb.settled([_status(4, 1, 3), _status(4, 1, 3), None], 3)  # one did not answer
    assert not cb.settled([_status(4, 1, 3), _status(4, 1, 3), _status(4, 0, 3)], 3)  # another epoch
    assert not cb.settled([_status(4, 1, 3), _status(4, 1, 3), _status(3, 1, 3)], 3)  # another leader
    assert not cb.settled([_status(4, 1, 2)] * 3, 3)  # a learner not promoted yet
    assert not cb.settled([_status(None, 1, 3)] * 3, 3)  # no leader


@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 2), st.integers(0, 3)), min_size=3, max_size=3))
def test_settled_is_agreement_on_a_full_voter_set(views):
    statuses = [_status(leader or None, epoch, voters) for leader, epoch, voters in views]
    expected = (
        len({(leader, epoch) for leader, epoch, _ in views}) == 1
        and views[0][0] != 0
        and all(voters == 3 for _, _, voters in views)
    )
    assert cb.settled(statuses, 3) is expected


# --- verdicts and the table -------------------------------------------------------------------------------


def _stats(per_s: float) -> object:
    return cb.PhaseStats(ok=int(per_s), errors=0, elapsed_s=1.0, writes_per_s=per_s, p50_ms=1.5, p99_ms=9.25)


def _rows(leader32: float, leader1: float) -> list:
    return [
        cb.Row("leader", 1, _stats(leader1), _stats(100.0)),
        cb.Row("leader", 32, _stats(leader32), _stats(100.0)),
        cb.Row("follower", 1, _stats(10.0), None),
    ]


def test_musts_met_and_missed():
    fast = cb.Failover((0.2, 0.3, 0.1))
    slow = cb.Failover((1.4, None, 1.6))
    assert fast.median_s == pytest.approx(0.2)
    assert slow.median_s == pytest.approx(1.5) and slow.failed == 1
    met = cb.evaluate_musts(_rows(leader32=100.0, leader1=50.0), fast, slow)
    assert [m.verdict for m in met] == ["met", "met", "met"]
    missed = cb.evaluate_musts(_rows(leader32=99.0, leader1=49.0), slow, fast)
    assert [m.verdict for m in missed] == ["missed", "missed", "missed"]
    assert "0.99" in missed[0].detail


def test_musts_without_etcd_are_not_measured():
    rows = [cb.Row("leader", 1, _stats(5.0), None), cb.Row("leader", 32, _stats(5.0), None)]
    musts = cb.evaluate_musts(rows, cb.Failover((0.1,)), None)
    assert [m.verdict for m in musts] == ["not measured"] * 3


def test_pre_replication_label_goes_away_with_replication():
    musts = cb.evaluate_musts(_rows(100.0, 50.0), None, None)
    assert cb.PRE_REPLICATION_LABEL in cb.format_musts(musts, replicated=False)
    assert cb.PRE_REPLICATION_LABEL not in cb.format_musts(musts, replicated=True)


def test_table_has_one_aligned_line_per_row_with_the_ratio():
    table = cb.format_table(_rows(leader32=250.0, leader1=60.0)).splitlines()
    assert len(table) == 3 + 3  # two heading lines, a rule, three rows
    assert len({len(line) for line in table[1:]}) == 1  # every line after the first is as wide
    leader32 = next(line for line in table if line.startswith("leader") and " 32 |" in line)
    assert "250" in leader32 and leader32.rstrip().endswith("2.50")
    follower = next(line for line in table if line.startswith("follower"))
    assert follower.rstrip().endswith("-")  # no etcd figure: no ratio


def test_failover_and_leader_change_lines():
    text = cb.format_failover(cb.Failover((0.01, None)), cb.Failover((1.5,)))
    assert "timeout" in text and "1500" in text
    assert "not measured" in cb.format_failover(None, None)
    assert "[met" in cb.format_leader_changes(0, 0)
    assert "[missed" in cb.format_leader_changes(0, 2)
    assert "etcd not measured" in cb.format_leader_changes(0, None)


def test_the_median_round_of_each_row_is_reported_whole():
    rounds = [_rows(leader32=90.0, leader1=40.0), _rows(leader32=120.0, leader1=60.0), _rows(110.0, 30.0)]
    rows = cb.median_rows(rounds)
    # Each row is the round with that row's median ratio, figures and ratio from the same round.
    assert rows[0].tn.writes_per_s == 40.0 and rows[0].ratio == pytest.approx(0.40)
    assert rows[1].tn.writes_per_s == 110.0 and rows[1].ratio == pytest.approx(1.10)
    assert rows[2].etcd is None and rows[2].ratio is None  # never measured on both: the first round's row
    # An even count takes the lower middle round (the musts are judged on the less favourable one).
    assert cb.median_rows(rounds[:2])[1].tn.writes_per_s == 90.0
    text = cb.format_rounds(rounds)
    assert "0.90   1.20   1.10" in text and text.count("\n") == 3


@settings(max_examples=100, deadline=None)
@given(ratios=st.lists(st.floats(0.01, 10.0, allow_nan=False), min_size=1, max_size=9))
def test_the_reported_ratio_is_a_median_of_the_rounds(ratios):
    rounds = [[cb.Row("leader", 32, _stats(100.0 * r), _stats(100.0))] for r in ratios]
    (row,) = cb.median_rows(rounds)
    got = row.ratio
    assert got in [cb.Row("leader", 32, _stats(100.0 * r), _stats(100.0)).ratio for r in ratios]
    below = sum(1 for r in rounds if r[0].ratio < got)
    above = sum(1 for r in rounds if r[0].ratio > got)
    assert below <= (len(ratios) - 1) // 2 and above <= len(ratios) // 2


# --- interpreter ----------------------------------------------------------------------------------------------


def test_the_report_names_the_interpreter_that_ran_the_nodes():
    info = cb.interpreter()
    assert info["executable"] == str(Path(sys.executable).resolve())
    # This process's own memory map decides the build: a libpython mapped from a shared object, or not.
    mapped = "libpython" in Path("/proc/self/maps").read_text()
    assert info["libpython_shared"] is mapped
    line = cb.format_interpreter(info)
    assert info["executable"] in line and info["python"] in line
    assert ("libpython shared" in line) is mapped


@pytest.mark.parametrize(("shared", "text"), [(True, "shared"), (False, "linked in"), (None, "unknown")])
def test_the_interpreter_line_says_each_build(shared, text):
    line = cb.format_interpreter({"executable": "/x/python", "python": "3.11.2", "libpython_shared": shared})
    assert line.startswith("interpreter: /x/python (Python 3.11.2, ") and text in line


# --- CPU per write ------------------------------------------------------------------------------------------


def test_a_processes_cpu_is_read_and_a_gone_one_is_unknown():
    before = cb.process_cpu_s(os.getpid())
    deadline = time.process_time() + 0.05
    while time.process_time() < deadline:  # burn a little CPU: the reading must move
        pass
    after = cb.process_cpu_s(os.getpid())
    assert before is not None and after is not None and after > before
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert cb.process_cpu_s(gone.pid) is None


@pytest.mark.parametrize(
    ("before", "after", "writes", "want"),
    [(1.0, 1.5, 1000, 0.5), (None, 1.5, 1000, None), (1.0, None, 1000, None), (1.0, 1.5, 0, None)],
)
def test_cpu_per_write_is_milliseconds_per_write_or_unknown(before, after, writes, want):
    assert cb.cpu_per_write_ms(before, after, writes) == want
