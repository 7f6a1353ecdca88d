"""The data API's configuration variables: defaults, parsing, and every bad value reported at once."""

from __future__ import annotations

import pytest

from node.config import Config, ConfigError

BASE = {"JWT_SECRET": "x" * 32}


def test_defaults():
    config = Config.from_env(BASE)
    assert config.db_max_body_bytes == 4 << 20
    assert config.db_max_load_bytes == 256 << 20
    assert config.db_max_statements == 1000
    assert config.db_statement_timeout_s == 5.0
    assert config.db_max_result_rows == 10_000
    assert config.db_max_result_bytes == 16 << 20
    assert config.db_queue_size == 256
    assert config.body_read_timeout_s == 10.0


def test_values_are_read():
    config = Config.from_env(
        {
            **BASE,
            "DB_MAX_BODY_BYTES": "1000",
            "DB_MAX_LOAD_BYTES": "2000",
            "DB_MAX_STATEMENTS": "3",
            "DB_STATEMENT_TIMEOUT": "0.5",
            "DB_MAX_RESULT_ROWS": "4",
            "DB_MAX_RESULT_BYTES": "5000",
            "DB_QUEUE_SIZE": "6",
            "BODY_READ_TIMEOUT": "7",
        }
    )
    assert (config.db_max_body_bytes, config.db_max_load_bytes, config.db_max_statements) == (1000, 2000, 3)
    assert (config.db_statement_timeout_s, config.db_max_result_rows, config.db_max_result_bytes) == (
        0.5,
        4,
        5000,
    )
    assert (config.db_queue_size, config.body_read_timeout_s) == (6, 7.0)


def test_bad_values_are_all_reported():
    with pytest.raises(ConfigError) as info:
        Config.from_env(
            {**BASE, "DB_MAX_STATEMENTS": "0", "DB_STATEMENT_TIMEOUT": "-1", "DB_QUEUE_SIZE": "many"}
        )
    assert len(info.value.problems) == 3
    assert all(
        any(var in p for p in info.value.problems)
        for var in ("DB_MAX_STATEMENTS", "DB_STATEMENT_TIMEOUT", "DB_QUEUE_SIZE")
    )
