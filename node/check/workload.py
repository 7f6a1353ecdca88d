"""A bounded client workload against a running cluster that records what every client saw.

It talks only to the node URLs it is given, through the public data API with one token:

* **set clients** insert unique integers into ``<table>_set`` (``INSERT``; the checker looks for each later);
* **register clients** (few per key: the linearizability search grows fast with unknown outcomes) read
  (``level=linearizable``), write and compare-and-set (``UPDATE … WHERE v = ?``, judged by ``rows_affected``)
  rows of ``<table>_reg``.

Each operation becomes one :class:`~node.check.history.Op` with its start and end on this process's monotonic
clock and an outcome classified conservatively: an answer that proves nothing happened (4xx, or 503 with a
code the node gives only *before* proposing: ``no_quorum``, ``not_leader``, ``not_writable``, ``busy``) is
``failed``; a timeout, a dropped connection or any other 5xx is ``unknown``. Load is bounded three ways: one
request in flight per client, a total operation cap and a duration. The tables carry a per-run suffix and are
dropped at the end unless the caller keeps them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import random
import secrets
import time
from collections.abc import Callable, Sequence
from typing import Any

import aiohttp

from node.check.history import Op

DEFINITE_FAILURES = frozenset({"no_quorum", "not_leader", "not_writable", "busy"})
FAILURE_BACKOFF_S = 0.1
# Reading a node's copy of the set: pages below a node's 10,000-row limit per result, and a bound on them
# (far above what a run's max_ops can insert).
CONTENTS_PAGE_ROWS = 5_000
CONTENTS_MAX_PAGES = 1_000


@dataclasses.dataclass(frozen=True)
class WorkloadConfig:
    urls: tuple[str, ...]
    token: str
    duration_s: float = 30.0
    set_clients_per_node: int = 2
    register_keys: int = 2
    register_clients_per_key: int = 2
    request_timeout_s: float = 5.0
    max_ops: int = 50_000  # hard cap on operations, whatever the duration
    pause_s: float = 0.0  # between one client's operations (lowers the load on small machines)
    table: str = ""  # defaults to tn_check_<random>
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.urls:
            raise ValueError("at least one node URL is needed")
        for url in self.urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"not an http(s) URL: {url!r}")
        if self.duration_s <= 0 or self.max_ops <= 0 or self.request_timeout_s <= 0:
            raise ValueError("duration, operation cap and timeout must be positive")
        if self.table and not self.table.replace("_", "").isalnum():
            raise ValueError("table names are letters, digits and underscores")


@dataclasses.dataclass
class Recorder:
    """Collects operations; ``mark`` notes events (faults) on the same clock."""

    clock: Callable[[], float] = time.monotonic
    ops: list[Op] = dataclasses.field(default_factory=list)
    marks: list[tuple[float, str]] = dataclasses.field(default_factory=list)
    _ids: Any = dataclasses.field(default_factory=lambda: itertools.count(1))

    def mark(self, what: str) -> float:
        now = self.clock()
        self.marks.append((now, what))
        return now

    def add(self, **fields: Any) -> Op:
        op = Op(id=next(self._ids), **fields)
        self.ops.append(op)
        return op


@dataclasses.dataclass(frozen=True)
class Answer:
    outcome: str
    body: Any = None
    executed_by: str | None = None
    epoch: int | None = None
    index: int | None = None
    error: str | None = None


class Client:
    """One HTTP session for the whole workload; every request has a deadline."""

    def __init__(self, config: WorkloadConfig, session: aiohttp.ClientSession) -> None:
        self.config = config
        self.session = session

    async def call(self, url: str, path: str, statements: list[Any]) -> Answer:
        headers = {"Authorization": f"Bearer {self.config.token}"}
        timeout = aiohttp.ClientTimeout(total=self.config.request_timeout_s)
        try:
            async with self.session.post(
                url + path, json=statements, headers=headers, timeout=timeout
            ) as resp:
                body = await resp.json(content_type=None)
                return classify(resp.status, body, resp.headers)
        except aiohttp.ClientConnectorError as e:
            # No connection was made, so no request was sent: a definite failure, not an unknown.
            return Answer("failed", error=f"{type(e).__name__}: {e}"[:200])
        except (TimeoutError, aiohttp.ClientError, ValueError) as e:
            return Answer("unknown", error=f"{type(e).__name__}: {e}"[:200])

    async def setup(self, table: str, keys: Sequence[str], deadline_s: float) -> None:
        statements = [
            f"CREATE TABLE IF NOT EXISTS {table}_set (v INTEGER PRIMARY KEY)",
            f"CREATE TABLE IF NOT EXISTS {table}_reg (k TEXT PRIMARY KEY, v INTEGER NOT NULL)",
            *[[f"INSERT OR IGNORE INTO {table}_reg (k, v) VALUES (?, 0)", k] for k in keys],
        ]
        await self._until_ok(statements, deadline_s, "create the check tables")

    async def drop(self, table: str, deadline_s: float) -> None:
        await self._until_ok(
            [f"DROP TABLE IF EXISTS {table}_set", f"DROP TABLE IF EXISTS {table}_reg"],
            deadline_s,
            "drop the check tables",
        )

    async def _until_ok(self, statements: list[Any], deadline_s: float, what: str) -> None:
        end = time.monotonic() + deadline_s
        last = None
        for attempt in itertools.count():
            url = self.config.urls[attempt % len(self.config.urls)]
            answer = await self.call(url, "/db/execute?transaction", statements)
            if answer.outcome == "ok" and not _statement_error(answer.body):
                return
            last = answer.error or _statement_error(answer.body)
            if time.monotonic() > end:
                raise RuntimeError(f"could not {what} within {deadline_s:.0f} s: {last}")
            await asyncio.sleep(0.2)

    async def contents(self, url: str, table: str) -> Any:
        """Both tables as seen by one node (``level=none``: this node's own copy), or None when unreachable.

        The set is read in pages of CONTENTS_PAGE_ROWS, after the last value of the page before: a node
        answers at most 10,000 rows per result (``result too large``), and a run acknowledges more values
        than that. Read once the workload has stopped; a node still catching up between two pages shows
        fewer values than the others and is read again."""
        values: list[Any] = []
        registers: list[list[Any]] | None = None
        for _ in range(CONTENTS_MAX_PAGES):
            after = f"WHERE v > {int(values[-1])} " if values else ""  # an integer (the set's values are)
            statements: list[Any] = [
                f"SELECT v FROM {table}_set {after}ORDER BY v LIMIT {CONTENTS_PAGE_ROWS}"
            ]
            if registers is None:
                statements.append(f"SELECT k, v FROM {table}_reg ORDER BY k")
            answer = await self.call(url, "/db/query?level=none", statements)
            if answer.outcome != "ok" or _statement_error(answer.body):
                return None
            results = answer.body["results"]
            page = [row[0] for row in results[0].get("values", [])]
            values += page
            if registers is None:
                registers = [list(row) for row in results[1].get("values", [])]
            if len(page) < CONTENTS_PAGE_ROWS:
                return {"set": values, "reg": registers}
        return None


def classify(status: int, body: Any, headers: Any) -> Answer:
    named = dict(
        executed_by=headers.get("X-TalentNest-Node"),
        epoch=_int(headers.get("X-TalentNest-Epoch")),
        index=_int(headers.get("X-TalentNest-Index")),
    )
    if status == 200 and isinstance(body, dict) and isinstance(body.get("results"), list):
        error = _statement_error(body)
        if error:
            return Answer("failed", body, error=error, **named)
        return Answer("ok", body, **named)
    code = body.get("code") if isinstance(body, dict) else None
    error = (body.get("error") if isinstance(body, dict) else None) or f"HTTP {status}"
    if 400 <= status < 500 or code in DEFINITE_FAILURES:
        return Answer("failed", body, error=f"{code}: {error}"[:200], **named)
    return Answer("unknown", body, error=f"{code}: {error}"[:200], **named)


def _statement_error(body: Any) -> str | None:
    if not isinstance(body, dict):
        return "no JSON body"
    for result in body.get("results") or []:
        if isinstance(result, dict) and result.get("error"):
            return str(result["error"])
    return None


def _int(raw: str | None) -> int | None:
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        return None


class Workload:
    def __init__(self, config: WorkloadConfig, recorder: Recorder | None = None) -> None:
        self.config = config
        self.recorder = recorder or Recorder()
        self.table = config.table or f"tn_check_{secrets.token_hex(4)}"
        self.keys = tuple(f"k{i}" for i in range(config.register_keys))
        self._rng = random.Random(config.seed)
        self._values = itertools.count(1)
        self._budget = config.max_ops
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    def _take(self) -> bool:
        if self._stop.is_set() or self._budget <= 0:
            return False
        self._budget -= 1
        return True

    async def run(self, session: aiohttp.ClientSession, *, setup_deadline_s: float = 60.0) -> None:
        client = Client(self.config, session)
        await client.setup(self.table, self.keys, setup_deadline_s)
        self.recorder.mark("workload_start")
        urls = self.config.urls
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._timer())
            for i, url in enumerate(urls):
                for j in range(self.config.set_clients_per_node):
                    tg.create_task(self._set_client(client, f"s{i}.{j}", url))
            for k, key in enumerate(self.keys):
                for j in range(self.config.register_clients_per_key):
                    url = urls[(k * self.config.register_clients_per_key + j) % len(urls)]
                    tg.create_task(self._register_client(client, f"r{k}.{j}", url, key))
        self.recorder.mark("workload_end")

    async def _timer(self) -> None:
        try:
            await asyncio.wait_for(self._stop.wait(), self.config.duration_s)
        except TimeoutError:
            self._stop.set()

    async def _record(
        self,
        client: Client,
        process: str,
        url: str,
        f: str,
        path: str,
        statements: list[Any],
        *,
        key: str | None = None,
        value: Any = None,
        result_of: Callable[[Any], Any] | None = None,
    ) -> Op:
        start = self.recorder.clock()
        answer = await client.call(url, path, statements)
        end = None if answer.outcome == "unknown" else max(start, self.recorder.clock())
        result = result_of(answer.body) if answer.outcome == "ok" and result_of else None
        return self.recorder.add(
            process=process,
            f=f,
            start=start,
            end=end,
            outcome=answer.outcome,
            key=key,
            value=value,
            result=result,
            node=url,
            executed_by=answer.executed_by,
            epoch=answer.epoch,
            index=answer.index,
            error=answer.error,
        )

    async def _set_client(self, client: Client, process: str, url: str) -> None:
        while self._take():
            value = next(self._values)
            op = await self._record(
                client,
                process,
                url,
                "add",
                "/db/execute",
                [[f"INSERT INTO {self.table}_set (v) VALUES (?)", value]],
                value=value,
            )
            await self._pause(op)

    async def _register_client(self, client: Client, process: str, url: str, key: str) -> None:
        table = f"{self.table}_reg"
        last_seen = 0
        while self._take():
            choice = self._rng.random()
            if choice < 0.4:
                op = await self._record(
                    client,
                    process,
                    url,
                    "read",
                    "/db/query?level=linearizable",
                    [[f"SELECT v FROM {table} WHERE k = ?", key]],
                    key=key,
                    result_of=_single_value,
                )
                if op.outcome == "ok" and op.result is not None:
                    last_seen = op.result
            elif choice < 0.7:
                value = next(self._values)
                op = await self._record(
                    client,
                    process,
                    url,
                    "write",
                    "/db/execute",
                    [[f"UPDATE {table} SET v = ? WHERE k = ?", value, key]],
                    key=key,
                    value=value,
                )
            else:
                new = next(self._values)
                op = await self._record(
                    client,
                    process,
                    url,
                    "cas",
                    "/db/execute",
                    [[f"UPDATE {table} SET v = ? WHERE k = ? AND v = ?", new, key, last_seen]],
                    key=key,
                    value=(last_seen, new),
                    result_of=_applied,
                )
            await self._pause(op)

    async def _pause(self, op: Op | None = None) -> None:
        # After a failure or an unknown outcome, back off a little: a client hammering a dead node would only
        # add operations that say nothing (and unknown ones make the linearizability search much larger).
        delay = self.config.pause_s + (FAILURE_BACKOFF_S if op is not None and op.outcome != "ok" else 0.0)
        if delay:
            await asyncio.sleep(delay)


def _single_value(body: Any) -> Any:
    values = body["results"][0].get("values") or []
    return values[0][0] if values else None


def _applied(body: Any) -> bool:
    return body["results"][0].get("rows_affected", 0) == 1
