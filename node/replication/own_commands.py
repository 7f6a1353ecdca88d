"""The commands a leader submitted itself, kept so that it need not decode them back from its own log.

A leader encodes every client write (``codec.encode_command``) and submits the payload; once the entry is
committed, the applier needs the ``Command`` again. Decoding it from the payload (JSON parse, one
``Statement`` per statement, one check per value) was ~7% of a busy leader's event loop, for an object it
held a moment before. The replicator keeps the command with the waiting client (bounded by the clients
waiting, dropped with them: step-down, resync, snapshot install, timeout) and uses it only when the entry
applied at that index holds the very payload object it submitted (identity: an entry that replaced it
after a leader change, or that was read back from the disk, is decoded as before).

The command kept must be exactly what decoding its payload gives, or the leader would apply something its
followers do not. :func:`decoded_form` builds that form without the JSON round trip, for the commands whose
every part is of a type the codec carries unchanged, and returns None for anything else (non-finite floats,
loads, unusual types): those are decoded. tests/replication/test_own_commands.py checks the equality for
generated commands.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from node.core.sqlreq import Statement, WriteCommand
from node.storage.statemachine import Command

_PLAIN = frozenset({str, int, bool, bytes, type(None)})  # parameter values the codec gives back as they were


def _plain_values(values: Any) -> bool:
    """Every value one the codec gives back unchanged (inlined: this runs for every value of every write)."""
    plain = _PLAIN
    for value in values:
        kind = type(value)
        if kind is float:
            if not math.isfinite(value):  # orjson writes the shortest repr: a finite float reads back equal
                return False
        elif kind not in plain:
            return False
    return True


def _decoded_params(params: Any) -> tuple[bool, Any]:
    """(ok, params as ``decode_command`` builds them): positional values a tuple, named ones a dict."""
    if params is None:
        return True, None
    kind = type(params)
    if kind is tuple or kind is list:
        if not _plain_values(params):
            return False, None
        return True, params if kind is tuple else tuple(params)
    if isinstance(params, Mapping):
        if not all(type(k) is str for k in params) or not _plain_values(params.values()):
            return False, None
        return True, params if kind is dict else dict(params)
    return False, None


def decoded_form(command: Command) -> Command | None:
    """``command`` as ``codec.decode_command(codec.encode_command(command))`` returns it, or None when that is
    not certain without decoding (then the caller decodes the payload). The command itself when it is in
    that form already (the common case: no copy)."""
    write = command.write
    if command.load is not None or type(command.sqlite_version) is not str or not command.sqlite_version:
        return None  # loads are rare and checked by the decoder; a missing version is stamped by encode
    if type(write.transaction) is not bool or type(command.unified) is not bool:
        return None
    if type(write.time_ns) is not int or type(write.seed) is not int or type(command.client) is not str:
        return None
    if not (command.request_id is None or type(command.request_id) is str):
        return None
    statements = write.statements
    rebuilt: list[Statement] | None = None
    for position, statement in enumerate(statements):
        if type(statement.sql) is not str:
            return None
        ok, params = _decoded_params(statement.params)
        if not ok:
            return None
        if params is not statement.params and rebuilt is None:
            rebuilt = list(statements[:position])
        if rebuilt is not None:
            rebuilt.append(statement if params is statement.params else Statement(statement.sql, params))
    if rebuilt is None and type(statements) is tuple:
        return command
    write = WriteCommand(tuple(statements if rebuilt is None else rebuilt), write.transaction, write.time_ns,
                         write.seed)  # fmt: skip
    return Command(
        write, unified=command.unified, client=command.client, request_id=command.request_id,
        sqlite_version=command.sqlite_version, load=None,
    )  # fmt: skip
