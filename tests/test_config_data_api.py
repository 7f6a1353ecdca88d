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
    assert config.db_write_step_budget == 20_000_000
    assert config.db_readers == 4
    assert config.db_readers_per_client == 0  # auto: half of DB_READERS


def test_reader_settings_reach_the_database():
    from node.supervisor import database_from

    config = Config.from_env(
        {**BASE, "DB_READERS": "6", "DB_READERS_PER_CLIENT": "5", "DB_WRITE_STEP_BUDGET": "1234"}
    )
    limits = database_from(config).limits
    assert (limits.readers, limits.per_client, limits.write_step_budget) == (6, 5, 1234)
    assert database_from(Config.from_env({**BASE, "DB_READERS": "6"})).limits.per_client == 3
    assert database_from(Config.from_env({**BASE, "DB_READERS": "1"})).limits.per_client == 1
    # A cap above the pool is the pool.
    assert database_from(Config.from_env({**BASE, "DB_READERS_PER_CLIENT": "9"})).limits.per_client == 4


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
            {
                **BASE,
                "DB_MAX_STATEMENTS": "0",
                "DB_STATEMENT_TIMEOUT": "-1",
                "DB_QUEUE_SIZE": "many",
                "DB_READERS": "0",
                "DB_READERS_PER_CLIENT": "-1",
                "DB_WRITE_STEP_BUDGET": "1e6",
            }
        )
    names = ("DB_MAX_STATEMENTS", "DB_STATEMENT_TIMEOUT", "DB_QUEUE_SIZE", "DB_READERS", "DB_READERS_PER_CLIENT",
             "DB_WRITE_STEP_BUDGET")  # fmt: skip
    assert len(info.value.problems) == len(names)
    assert all(any(p.startswith(var + "=") for p in info.value.problems) for var in names)
