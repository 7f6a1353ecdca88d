"""The checkers on histories whose verdict is known, and against a brute-force oracle on random ones."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.check import checkers
from node.check.checkers import Isolation, check_register, check_set
from node.check.history import HistoryError, Op, dump_jsonl, load_jsonl

_ids = itertools.count(1)


def op(f, start, end, outcome="ok", key="k", value=None, result=None, **kw):
    if outcome == "unknown":
        end = None
    return Op(next(_ids), kw.pop("process", "p"), f, start, end, outcome, key, value, result, **kw)


def w(v, s, e, outcome="ok"):
    return op("write", s, e, outcome, value=v)


def r(v, s, e, outcome="ok"):
    return op("read", s, e, outcome, result=v)


def cas(old, new, applied, s, e, outcome="ok"):
    return op("cas", s, e, outcome, value=(old, new), result=applied)


# -------------------------------------------------------------------------------------- known verdicts


def test_sequential_history_is_linearizable_and_the_witness_is_the_real_order():
    ops = [w(1, 0, 1), r(1, 2, 3), cas(1, 2, True, 4, 5), r(2, 6, 7)]
    verdict = check_register("k", ops, initial=0)
    assert verdict.linearizable is True
    assert verdict.order == tuple(o.id for o in ops)


def test_stale_read_after_acknowledged_write_is_not_linearizable():
    ops = [w(1, 0, 1), w(2, 2, 3), r(1, 4, 5)]
    verdict = check_register("k", ops, initial=0)
    assert verdict.linearizable is False
    assert verdict.blocked_by == ops[2].id


def test_concurrent_write_may_be_seen_or_not():
    # The read overlaps the write: both 0 and 1 are fine.
    for seen in (0, 1):
        assert check_register("k", [w(1, 0, 10), r(seen, 5, 6)], initial=0).linearizable is True


def test_reads_must_not_go_back_in_time():
    # Two sequential reads during one long write: 1 then 0 is impossible (the write cannot be undone).
    ops = [w(1, 0, 10), r(1, 2, 3), r(0, 4, 5)]
    assert check_register("k", ops, initial=0).linearizable is False


def test_unknown_write_may_have_happened_or_not():
    assert check_register("k", [w(1, 0, None, "unknown"), r(1, 5, 6)], initial=0).linearizable is True
    assert check_register("k", [w(1, 0, None, "unknown"), r(0, 5, 6)], initial=0).linearizable is True


def test_unknown_write_cannot_take_effect_before_it_started():
    assert check_register("k", [r(1, 0, 1), w(1, 2, None, "unknown")], initial=0).linearizable is False


def test_failed_write_must_have_no_effect():
    assert check_register("k", [w(1, 0, 1, "failed"), r(1, 2, 3)], initial=0).linearizable is False
    assert check_register("k", [w(1, 0, 1, "failed"), r(0, 2, 3)], initial=0).linearizable is True


def test_cas_result_must_match_the_state():
    assert check_register("k", [cas(0, 5, True, 0, 1), r(5, 2, 3)], initial=0).linearizable is True
    assert check_register("k", [cas(0, 5, False, 0, 1)], initial=0).linearizable is False
    assert check_register("k", [cas(3, 5, True, 0, 1)], initial=0).linearizable is False
    assert check_register("k", [cas(3, 5, False, 0, 1), r(0, 2, 3)], initial=0).linearizable is True


def test_two_successful_cas_from_the_same_value_cannot_both_win():
    ops = [cas(0, 1, True, 0, 10), cas(0, 2, True, 0, 10)]
    assert check_register("k", ops, initial=0).linearizable is False


def test_budget_exhaustion_is_undecided_not_a_verdict():
    ops = [w(i, 0, 100) for i in range(12)] + [r(99, 200, 201)]
    verdict = check_register("k", ops, initial=0, budget=50)
    assert verdict.linearizable is None


def test_registers_are_judged_per_key():
    ops = [
        op("write", 0, 1, key="a", value=1),
        op("read", 2, 3, key="b", result=0),
        op("read", 2, 3, key="a", result=0),
    ]
    verdicts = {v.key: v.linearizable for v in checkers.check_registers(ops, {"a": 0, "b": 0})}
    assert verdicts == {"a": False, "b": True}


def test_set_checker_names_each_class_of_violation():
    ops = [
        op("add", 0, 1, value=1),
        op("add", 0, 1, value=2),
        op("add", 0, 1, "failed", value=3),
        op("add", 0, None, "unknown", value=4),
        op("add", 0, None, "unknown", value=5),
    ]
    verdict = check_set(ops, final={1, 3, 4, 99})
    assert verdict.lost == (2,)
    assert verdict.unexpected == (99,)
    assert verdict.failed_present == (3,)
    assert verdict.recovered == (4,)
    assert not verdict.valid
    assert check_set(ops, final={1, 2, 5}).valid


def test_convergence_groups_nodes_by_contents():
    verdict = checkers.check_convergence({"a": {"t": [[1]]}, "b": {"t": [[1]]}, "c": {"t": [[2]]}})
    assert not verdict.identical
    assert verdict.groups == (("a", "b"), ("c",))
    assert checkers.check_convergence({"a": [1], "b": [1]}).identical


def test_epochs_with_two_acknowledging_nodes_are_violations():
    ok1 = op("add", 0, 1, value=1, executed_by="n1", epoch=3, index=10)
    ok2 = op("add", 0, 1, value=2, executed_by="n2", epoch=3, index=11)
    ok3 = op("add", 0, 1, value=3, executed_by="n2", epoch=4, index=10)
    verdict = checkers.check_epochs([ok1, ok2, ok3])
    assert verdict.two_leaders == ((3, ("n1", "n2")),)
    assert verdict.changed_entries == ((10, (3, 4)),)
    assert checkers.check_epochs([ok1, op("add", 0, 1, value=4, executed_by="n1", epoch=3, index=11)]).valid


def test_isolated_node_acknowledging_is_a_violation():
    inside = op("add", 5, 6, value=1, executed_by="n3")
    before = op("add", 0, 6, value=2, executed_by="n3")
    other = op("add", 5, 6, value=3, executed_by="n2")
    cut = Isolation("n3", 4, 10)
    assert checkers.check_isolated_acks([inside, before, other], [cut]) == (inside.id,)


def test_availability_measures_first_write_and_longest_gap():
    ops = [
        op("add", 0, 1, value=1),
        op("add", 2, 3, value=2),
        op("add", 3, 9, value=3),
        op("add", 9.5, 10, value=4),
    ]
    a = checkers.availability(ops, since=2, until=11)
    assert a.first_write_s == pytest.approx(1)
    assert a.longest_gap_s == pytest.approx(6)


def test_availability_counts_no_gap_after_the_workload_stopped_trying():
    """A workload that reached its operation cap stops issuing before the run ends: the stretch after its
    last attempt is no unavailability. Failed attempts that go on until the end are."""
    done_early = [op("add", 1, 2, value=1), op("add", 2, 3, value=2)]
    assert checkers.availability(done_early, since=0, until=30).longest_gap_s == pytest.approx(2)
    failing = [*done_early, op("add", 4, 5, value=3, outcome="failed"), op("add", 29, 30, value=4, outcome="failed")]
    assert checkers.availability(failing, since=0, until=30).longest_gap_s == pytest.approx(27)


def test_history_round_trips_and_refuses_nonsense():
    ops = [w(1, 0, 1), cas(1, 2, True, 1, 2), w(3, 4, None, "unknown")]
    assert load_jsonl(dump_jsonl(ops)) == ops
    for bad in (
        '{"id": 1}',
        "[1]",
        "nope",
        '{"id":1,"process":"p","f":"x","start":0,"end":1,"outcome":"ok"}',
        '{"id":1,"process":"p","f":"read","start":0,"end":1,"outcome":"maybe"}',
        '{"id":1,"process":"p","f":"read","start":2,"end":1,"outcome":"ok"}',
    ):
        with pytest.raises(HistoryError):
            load_jsonl(bad)


# ------------------------------------------------------------------------------- brute-force oracle


def brute_force(ops, initial):
    """Try every subset of unknown ops and every order consistent with real time."""
    chosen = [o for o in ops if checkers._constrains(o)]
    definite = [o for o in chosen if o.outcome == "ok"]
    unknown = [o for o in chosen if o.outcome == "unknown"]
    for k in range(len(unknown) + 1):
        for subset in itertools.combinations(unknown, k):
            group = definite + list(subset)
            for order in itertools.permutations(group):
                if not all(
                    not ((b.end if b.end is not None else math.inf) < a.start)
                    for i, a in enumerate(order)
                    for b in order[i + 1 :]
                ):
                    continue
                state = initial
                for o in order:
                    state = checkers.register_step(state, o)
                    if state is checkers._INVALID:
                        break
                else:
                    return True
    return False


@st.composite
def histories(draw):
    n = draw(st.integers(1, 6))
    ops = []
    for _ in range(n):
        f = draw(st.sampled_from(["read", "write", "cas"]))
        start = draw(st.integers(0, 8))
        end = start + draw(st.integers(0, 4))
        outcome = draw(st.sampled_from(["ok", "ok", "ok", "failed", "unknown"]))
        value = draw(st.integers(0, 2))
        if f == "read":
            ops.append(r(value, start, end, outcome))
        elif f == "write":
            ops.append(w(value, start, end, outcome))
        else:
            ops.append(cas(value, draw(st.integers(0, 2)), draw(st.booleans()), start, end, outcome))
    return ops


@settings(max_examples=400, deadline=None)
@given(histories())
def test_search_agrees_with_brute_force(ops):
    assert check_register("k", ops, initial=0).linearizable is brute_force(ops, 0)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["read", "write", "cas"]), st.integers(0, 3), st.integers(0, 3)),
        min_size=1,
        max_size=40,
    )
)
def test_any_sequential_run_of_a_real_register_is_linearizable(steps):
    state, ops, t = 0, [], 0
    for f, a, b in steps:
        if f == "read":
            ops.append(r(state, t, t + 1))
        elif f == "write":
            ops.append(w(a, t, t + 1))
            state = a
        else:
            ops.append(cas(a, b, state == a, t, t + 1))
            state = b if state == a else state
        t += 2
    verdict = check_register("k", ops, initial=0)
    assert verdict.linearizable is True
    assert verdict.order == tuple(o.id for o in ops)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(["read", "write"]), st.integers(0, 3)), min_size=2, max_size=30),
    st.data(),
)
def test_any_wrong_read_in_a_sequential_run_is_caught(steps, data):
    state, ops, t = 0, [], 0
    for f, a in steps:
        ops.append(r(state, t, t + 1) if f == "read" else w(a, t, t + 1))
        state = state if f == "read" else a
        t += 2
    reads = [i for i, o in enumerate(ops) if o.f == "read"]
    if not reads:
        ops.append(r(state, t, t + 1))
        reads = [len(ops) - 1]
    i = data.draw(st.sampled_from(reads))
    wrong = data.draw(st.integers(0, 3).filter(lambda v: v != ops[i].result))
    ops[i] = r(wrong, ops[i].start, ops[i].end)
    assert check_register("k", ops, initial=0).linearizable is False


def test_checkers_are_pure():
    import pathlib

    import node.check
    from tests.core.test_purity import violations

    folder = pathlib.Path(node.check.__file__).parent
    for name in ("checkers.py", "history.py"):
        assert violations(folder / name, "node.check") == []


def test_operator_command_refuses_bad_arguments_with_status_2(monkeypatch, capsys):
    from node.check.__main__ import main

    monkeypatch.delenv("TN_TOKEN", raising=False)
    monkeypatch.delenv("JWT_SECRET", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["http://127.0.0.1:9"])
    assert exit_info.value.code == 2 and "token" in capsys.readouterr().err
    assert main(["--token", "x", "ftp://127.0.0.1:9"]) == 2
    assert "not an http(s) URL" in capsys.readouterr().err


def test_classify_separates_definite_failures_from_unknown_outcomes():
    from node.check.workload import classify

    ok = classify(
        200, {"results": [{"rows_affected": 1}]}, {"X-TalentNest-Epoch": "3", "X-TalentNest-Node": "7"}
    )
    assert (ok.outcome, ok.epoch, ok.executed_by) == ("ok", 3, "7")
    assert classify(200, {"results": [{"error": "no such table: t"}]}, {}).outcome == "failed"
    for code in ("no_quorum", "not_leader", "not_writable", "busy"):
        assert classify(503, {"error": "x", "code": code}, {}).outcome == "failed"
    assert classify(400, {"error": "x", "code": "bad_request"}, {}).outcome == "failed"
    for status, code in (
        (503, "outcome_unknown"),
        (500, "internal_error"),
        (502, None),
        (503, "unavailable"),
    ):
        assert classify(status, {"error": "x", "code": code}, {}).outcome == "unknown"
