"""The peer-message incarnation: strictly increasing across starts, whatever this host's clock does."""

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.runtime import incarnation as inc

NOW_MS = 1_800_000_000_000


def test_first_start_uses_the_clock_and_persists_it(tmp_path):
    data = tmp_path / "data"
    assert inc.next_incarnation(data, NOW_MS) == NOW_MS
    assert (data / inc.FILE_NAME).read_text() == f"{NOW_MS}\n"
    assert [p.name for p in data.iterdir()] == [inc.FILE_NAME]  # no temporary file left behind


def test_a_clock_that_steps_back_still_gives_a_greater_incarnation(tmp_path):
    first = inc.next_incarnation(tmp_path, NOW_MS)
    assert inc.next_incarnation(tmp_path, NOW_MS - 3_600_000) == first + 1
    assert inc.next_incarnation(tmp_path, 0) == first + 2


def test_a_lost_or_corrupt_file_falls_back_to_the_clock(tmp_path):
    inc.next_incarnation(tmp_path, NOW_MS)
    (tmp_path / inc.FILE_NAME).write_bytes(b"\xff garbage" + b"9" * 100)
    assert inc.next_incarnation(tmp_path, NOW_MS + 5) == NOW_MS + 5
    (tmp_path / inc.FILE_NAME).write_text("\u00b2\u00b3")
    assert inc.next_incarnation(tmp_path, NOW_MS + 9) == NOW_MS + 9
    os.remove(tmp_path / inc.FILE_NAME)
    assert inc.next_incarnation(tmp_path, NOW_MS + 10) == NOW_MS + 10


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 2**45), min_size=1, max_size=20))
def test_incarnations_strictly_increase_for_any_clock_readings(tmp_path_factory, clock_readings):
    data = tmp_path_factory.mktemp("data")
    seen = [inc.next_incarnation(data, now_ms) for now_ms in clock_readings]
    assert all(a < b for a, b in zip(seen, seen[1:], strict=False))
    assert all(s >= now for s, now in zip(seen, clock_readings, strict=True))


def test_an_unusable_data_dir_is_an_os_error_naming_data_dir(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    with pytest.raises(OSError, match="DATA_DIR"):
        inc.next_incarnation(not_a_dir, NOW_MS)
