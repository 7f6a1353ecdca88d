"""Where ReplicatedDataService stamps a write: small ones on the event loop (two thread switches cost more
than the work), anything large or with many parameters on a thread (never per-character work on the loop)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from node.core.sqlreq import DbRequest, Flags, Statement, rewrite_time_keywords, stamp_write
from node.replication.service import INLINE_PREPARE_BYTES, SEED_BATCH, UrandomSeeds, _inline_size
from node.service import WriteRequest

values = st.one_of(st.none(), st.integers(), st.floats(), st.text(max_size=3000), st.binary(max_size=3000))
params = st.one_of(
    st.none(),
    st.lists(values, max_size=80).map(tuple),
    st.dictionaries(st.text(min_size=1, max_size=5), values, max_size=80),
)
statements = st.lists(st.builds(Statement, st.text(max_size=3000), params), min_size=1, max_size=5)


def test_a_single_small_insert_is_prepared_inline():
    request = WriteRequest((Statement("INSERT INTO t(a, b) VALUES(?, ?)", (1, "x" * 100)),))
    assert _inline_size(request) <= INLINE_PREPARE_BYTES


@given(statements)
def test_only_writes_that_are_small_in_every_part_are_inline(stmts):
    """Property: a write judged small has at most INLINE_PREPARE_BYTES of SQL text and of text/blob
    parameters together, and at most 64 parameters per statement."""
    request = WriteRequest(tuple(stmts))
    if _inline_size(request) > INLINE_PREPARE_BYTES:
        return
    size = 0
    for s in stmts:
        size += len(s.sql)
        vals = [] if s.params is None else list(s.params.values() if isinstance(s.params, dict) else s.params)
        assert len(vals) <= 64
        size += sum(len(v) for v in vals if isinstance(v, str | bytes))
    assert size <= INLINE_PREPARE_BYTES


def test_seeds_are_63_bit_and_refilled_batch_after_batch():
    """Seeds come from os.urandom SEED_BATCH at a time: every one fits 63 bits (as WriteCommand keeps it),
    the batch is refilled when spent, and they are not one value repeated."""
    seeds = UrandomSeeds()
    drawn = [seeds() for _ in range(3 * SEED_BATCH + 1)]
    assert all(0 <= seed < 1 << 63 for seed in drawn)
    assert len(set(drawn)) > 3 * SEED_BATCH - 3  # 64 random bits: a repeat is all but impossible
    assert len(seeds._left) == SEED_BATCH - 1  # bounded: one batch at most, refilled only when empty


@given(statements)
def test_stamping_keeps_statements_without_time_keywords_and_rewrites_the_others(stmts):
    """Property: a stamped statement is the rewrite of the original's SQL with the same values, and the very
    same value when the rewrite changed nothing (no copy per write)."""
    write = stamp_write(DbRequest(tuple(stmts), Flags()), time_ns=1, seed=2)
    for original, stamped in zip(stmts, write.statements, strict=True):
        assert stamped == Statement(rewrite_time_keywords(original.sql), original.params)
        if "current_" not in original.sql.lower():
            assert stamped is original
