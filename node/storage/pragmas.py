"""Which pragmas user SQL may run: an allow-list, because a pragma that sets something changes the connection
for every client that uses it afterwards (and a replica that restarts would not have that setting).

Three kinds are allowed:

* **reports** only read (the schema, integrity, the engine's build): allowed with or without an argument,
  which for them names a table, an index or a row limit, never a new setting;
* **settings** may be read (``PRAGMA foreign_keys``) but not set (``PRAGMA foreign_keys=OFF`` or
  ``PRAGMA foreign_keys(0)``);
* **file fields** (``user_version``, ``application_id``) live in the database file itself, so setting them is
  an ordinary, replicated write (a query refuses it as it refuses every write).

Everything else (``optimize``, ``wal_checkpoint``, ``incremental_vacuum``, ``shrink_memory``,
``temp_store_directory``, and pragmas SQLite does not know, which it ignores silently) is refused naming the
pragma.

How SQLite reports the forms to the authorizer (SQLITE_PRAGMA, arg1 = name, arg2 = value, db = schema),
checked against apsw 3.54: ``PRAGMA x=1`` and ``PRAGMA x(1)`` give ``("x", "1")``; ``PRAGMA main.x=1`` the
same with db ``"main"``; ``PRAGMA x`` gives ``("x", None)``. The table-valued forms never set anything
(SQLite offers them only for pragmas without side effects, and their arguments are the table or schema a
report is about): ``SELECT * FROM pragma_x`` reports ``("x", None)``, ``pragma_table_info('t')`` reports
only an SQLITE_READ of the virtual table, and ``pragma_cache_size(5)`` reads 5 as a schema name (an error).
"""

from __future__ import annotations

REPORTS = frozenset(
    {
        "table_info", "table_xinfo", "table_list", "index_list", "index_info", "index_xinfo",
        "foreign_key_list", "foreign_key_check", "integrity_check", "quick_check", "database_list",
        "collation_list", "function_list", "module_list", "pragma_list", "compile_options", "page_count",
        "freelist_count", "data_version",
    }
)  # fmt: skip

SETTINGS = frozenset(
    {
        "foreign_keys", "cache_size", "page_size", "encoding", "journal_mode", "synchronous", "auto_vacuum",
        "busy_timeout", "recursive_triggers", "reverse_unordered_selects", "query_only", "max_page_count",
        "mmap_size", "temp_store", "wal_autocheckpoint", "locking_mode", "secure_delete", "cell_size_check",
        "automatic_index", "defer_foreign_keys", "ignore_check_constraints", "legacy_alter_table",
        "trusted_schema", "analysis_limit", "soft_heap_limit", "hard_heap_limit", "threads",
        "journal_size_limit", "schema_version", "count_changes", "full_column_names", "short_column_names",
        "empty_result_callbacks", "checkpoint_fullfsync", "fullfsync", "writable_schema", "cache_spill",
        "case_sensitive_like", "read_uncommitted",
    }
)  # fmt: skip

FILE_FIELDS = frozenset({"user_version", "application_id"})


def refusal(name: str, value: str | None) -> str | None:
    """Why the pragma ``name`` (with the authorizer's ``value``, None when none was given) is refused, or None.

    A pure function of its arguments, so the same command is refused or allowed identically on every node.
    """
    pragma = name.lower()
    if pragma in REPORTS:
        return None
    if pragma in FILE_FIELDS:
        # A write like any other: on a query connection the read-only check refuses it (and query_only).
        return None
    if pragma in SETTINGS:
        if value is None:
            return None
        return f"pragma {pragma} cannot be set: it changes the connection for every client"
    return f"pragma {pragma} is not allowed: only pragmas that report or read a setting may run"
