"""A leader applies the commands it submitted itself without decoding them back from its log, and what it
applies is exactly what decoding would give (node.replication.own_commands).

The decoded form is checked against the codec for generated commands of every shape the codec carries
(positional and named values of each type, non-finite floats, blobs, lists, loads, a missing SQLite
version); the Replicator's use of it is checked with the real core and log: the command kept is used only
for the very payload submitted, and is gone with its waiter (answered, step-down, snapshot install).
"""

from __future__ import annotations

import asyncio
import math

from hypothesis import given, settings
from hypothesis import strategies as st

from node.actors.replicator import Replicator, _Waiter
from node.core.replication import machine
from node.core.replication import messages as msg
from node.core.sqlreq import Statement, WriteCommand
from node.replication import codec
from node.replication.own_commands import decoded_form
from node.storage.statemachine import Applied, Command, LoadFile
from tests.replication.test_log_write_failure import follower

_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=8),
    st.binary(max_size=8),
)
_params = st.one_of(
    st.none(),
    st.lists(_values, max_size=4),
    st.lists(_values, max_size=4).map(tuple),
    st.dictionaries(st.text(alphabet="abcxyz_", min_size=1, max_size=4), _values, max_size=3),
)
_statements = st.lists(st.builds(Statement, st.text(max_size=20), _params), max_size=4)
_commands = st.builds(
    Command,
    st.builds(
        WriteCommand, _statements.map(tuple), st.booleans(), st.integers(0, 2**62), st.integers(0, 2**63 - 1)
    ),
    unified=st.booleans(),
    client=st.text(max_size=6),
    request_id=st.one_of(st.none(), st.text(min_size=1, max_size=6)),
    sqlite_version=st.one_of(st.none(), st.just("3.54.0"), st.just("")),
    load=st.one_of(st.none(), st.just(LoadFile("a" * 64, 10))),
)


def _same(a: object, b: object) -> bool:
    """Equal, NaN included (a NaN parameter binds the same NaN), and of the same types all the way down."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, tuple | list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, Command | WriteCommand | Statement):
        return all(_same(getattr(a, f), getattr(b, f)) for f in a.__slots__)
    return a == b


@settings(max_examples=400, deadline=None)
@given(_commands)
def test_the_decoded_form_is_what_decoding_the_payload_gives(command):
    payload = codec.encode_command(command)
    form = decoded_form(command)
    if form is None:
        return  # the applier decodes the payload: nothing to compare
    decoded = codec.decode_command(payload)
    assert _same(form, decoded), (form, decoded)
    assert codec.encode_command(form) == payload  # byte-identical


def test_plain_commands_have_a_decoded_form_and_others_are_decoded():
    write = WriteCommand((Statement("INSERT INTO t VALUES (?, ?)", (1, "x")),), False, 5, 7)
    plain = Command(write, client="c", sqlite_version="3.54.0")
    assert decoded_form(plain) is plain  # already in the form decoding gives: no copy
    listed = Command(
        WriteCommand((Statement("INSERT INTO t VALUES (?)", [1.5]),), False, 5, 7), sqlite_version="3.54.0"
    )
    form = decoded_form(listed)
    assert form is not None and form.write.statements[0].params == (1.5,)
    assert decoded_form(Command(write, sqlite_version=None)) is None  # the encoder stamps a version
    nan = Command(
        WriteCommand((Statement("SELECT ?", (float("nan"),)),), False, 5, 7), sqlite_version="3.54.0"
    )
    assert decoded_form(nan) is None
    assert decoded_form(Command(write, sqlite_version="3.54.0", load=LoadFile("a" * 64, 1))) is None


class RecordingDatabase:
    """Just what ``_apply_run`` asks of a database: records the commands of each apply."""

    is_open = True

    def __init__(self) -> None:
        self.applied: list[tuple[int, tuple[Command, ...]]] = []

    async def apply_entries(self, entries):
        self.applied.extend((entry.index, entry.commands) for entry in entries)
        return [tuple(Applied((), entry.index) for _ in entry.commands) for entry in entries]


def _counting_decode(monkeypatch) -> list[bytes]:
    seen: list[bytes] = []
    real = codec.decode_command

    def decode(data: bytes) -> Command:
        seen.append(data)
        return real(data)

    monkeypatch.setattr(codec, "decode_command", decode)
    return seen


def _command(n: int) -> tuple[Command, bytes]:
    command = Command(
        WriteCommand((Statement("INSERT INTO t VALUES (?)", (n,)),), False, n, n), client="c",
        sqlite_version="3.54.0",
    )  # fmt: skip
    return command, codec.encode_command(command)


def _hold(r: Replicator, index: int, command: Command, payload: bytes, epoch: int = 1) -> _Waiter:
    waiter = _Waiter(asyncio.get_running_loop().create_future(), epoch, index)
    waiter.payload, waiter.command = payload, decoded_form(command)
    r._by_index[index] = (f"w{index}", waiter)
    return waiter


async def test_the_applier_uses_the_command_only_for_the_very_payload_submitted(tmp_path, monkeypatch):
    decodes = _counting_decode(monkeypatch)
    async with follower(tmp_path) as (r, _net, _completer):
        database = RecordingDatabase()
        r.database = database
        mine, mine_payload = _command(1)
        other, other_payload = _command(2)
        _hold(r, 2, mine, mine_payload)
        # Index 3: this node submitted a command, but the entry there now is another leader's (truncated and
        # replaced), with the same bytes even: a copy is not the payload submitted, so it is decoded.
        _hold(r, 3, other, other_payload)
        copy = bytes(bytearray(other_payload))
        run = [msg.Entry(1, 2, msg.Kind.COMMAND, mine_payload), msg.Entry(2, 3, msg.Kind.COMMAND, copy)]
        assert await r._apply_run(run, sum(len(e.payload) for e in run)) == 2
        assert decodes == [copy]
        ((index2, (applied2,)), (index3, (applied3,))) = database.applied
        assert (index2, index3) == (2, 3)  # each command at its own entry's index
        assert applied2 is mine
        assert _same(applied3, codec.decode_command(copy))


async def test_kept_commands_go_with_their_waiters(tmp_path, monkeypatch):
    decodes = _counting_decode(monkeypatch)
    async with follower(tmp_path) as (r, _net, _completer):
        r.database = RecordingDatabase()
        command, payload = _command(1)
        entry = msg.Entry(1, 2, msg.Kind.COMMAND, payload)
        waiter = _hold(r, 2, command, payload)
        assert r._own_command(entry) is command
        # Answered: the waiter (and so the command) is dropped; the cache is never larger than the waiters.
        assert await r._apply_run([entry], len(payload)) == 1
        assert waiter.future.done() and r._by_index == {}
        assert r._own_command(entry) is None
        # Step-down: this follower is not leading, so waiting writes are answered and forgotten.
        _hold(r, 2, command, payload)
        assert r.state is not None and r.state.role != machine.LEADER
        r._settle_lost_quorum()
        assert r._own_command(entry) is None
        # A snapshot installed over the index: forgotten too.
        _hold(r, 2, command, payload)
        r._installed(msg.InstallSnapshot(msg.LogId(1, 2), r.state.config))
        assert r._own_command(entry) is None
        assert decodes == []


class _Net:
    """A transport for a cluster of one: nothing to send, nobody refused."""

    def send(self, *_args, **_kwargs) -> None:
        pass

    def recently_refused(self, *_args) -> bool:
        return False

    def ping(self, *_args) -> None:
        pass


async def test_a_leader_applies_its_own_writes_without_decoding_them(tmp_path, monkeypatch):
    """End to end through the real core and log (a cluster of one): the core keeps the payload object it
    was given, so the kept command is found for every write and nothing is decoded."""
    decodes = _counting_decode(monkeypatch)
    async with follower(tmp_path) as (r, _net, _completer):
        database = RecordingDatabase()
        r.database, r.transport = database, _Net()
        r.state, _ = machine.bootstrap("me", frozenset({"me"}), r.options, "c")
        stop = asyncio.Event()
        tasks = [asyncio.create_task(r._loop(stop)), asyncio.create_task(r._applier())]
        try:
            async with asyncio.timeout(10):
                for _ in range(1000):  # bounded; the timeout bounds it in time
                    if r.state.role == machine.LEADER and r.state.writable:
                        break
                    await asyncio.sleep(0.01)
                written = [_command(n) for n in range(1, 6)]
                answers = await asyncio.gather(*(r.submit(p, 10, command=c) for c, p in written))
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        applied = [c for _, commands in database.applied for c in commands]
        assert [a[1] for a in answers] == sorted(a[1] for a in answers)
        assert len(applied) == 5 and all(a is c for a, (c, _) in zip(applied, written, strict=True))
        assert decodes == []
        assert r._by_index == {} and r._waiters == {}  # nothing kept once answered
