"""A steady write load against real nodes, recording every acknowledgement (for handover/failover figures).

Each writer thread round-robins its INSERTs over the nodes ``targets()`` names at that moment (a stopped
node's requests fail and the next one is tried), one request at a time on kept-alive connections. Every
value is unique; an answer 200 means acknowledged, and the row must then be on every surviving node. The
threads stop on :meth:`WriteLoad.stop` or after ``max_writes`` each (bounded in count), and every request
has a timeout (bounded in time).

Used by ``bench/handover.py`` and ``tests/integration/test_handover.py``.
"""

from __future__ import annotations

import http.client
import itertools
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Ack:
    value: int
    sent_s: float  # time.monotonic() when the request went out
    acked_s: float  # time.monotonic() when the 200 arrived
    node_id: int  # X-TalentNest-Node: who executed it (the leader of that moment)
    epoch: int


@dataclass(frozen=True, slots=True)
class Failure:
    value: int
    at_s: float
    status: int  # 0: no HTTP answer (connection refused or reset, timeout)
    code: str
    sent_s: float = 0.0
    target: str = ""


class WriteLoad:
    def __init__(
        self,
        targets: Callable[[], list[str]],
        token: str,
        *,
        threads: int = 2,
        table: str = "t",
        request_timeout_s: float = 15.0,
        max_writes: int = 200_000,
        pause_after_failure_s: float = 0.005,
    ) -> None:
        self._targets = targets  # base URLs, e.g. "http://127.0.5.2:4001"
        self._token = token
        self._table = table
        self._timeout_s = request_timeout_s
        self._max_writes = max_writes
        self._pause_s = pause_after_failure_s
        self._values = itertools.count(1)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.acks: list[Ack] = []
        self.failures: list[Failure] = []
        self._threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True, name=f"writer-{i}")
            for i in range(threads)
        ]

    def start(self) -> WriteLoad:
        for t in self._threads:
            t.start()
        return self

    def stop(self, timeout_s: float = 20.0) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=timeout_s)
        alive = [t.name for t in self._threads if t.is_alive()]
        if alive:
            raise RuntimeError(f"writer threads did not stop within {timeout_s} s: {alive}")

    def snapshot(self) -> tuple[list[Ack], list[Failure]]:
        with self._lock:
            return list(self.acks), list(self.failures)

    def acked_values(self) -> set[int]:
        with self._lock:
            return {a.value for a in self.acks}

    def _run(self, number: int) -> None:
        connections: dict[str, http.client.HTTPConnection] = {}
        turn = number
        try:
            for _ in range(self._max_writes):
                if self._stop.is_set():
                    return
                targets = self._targets()
                if not targets:
                    time.sleep(self._pause_s)
                    continue
                base = targets[turn % len(targets)]
                turn += 1
                with self._lock:
                    value = next(self._values)
                self._write(connections, base, value)
        finally:
            for conn in connections.values():
                conn.close()

    def _write(self, connections: dict[str, http.client.HTTPConnection], base: str, value: int) -> None:
        host = base.removeprefix("http://")
        body = json.dumps([[f"INSERT INTO {self._table} (v) VALUES (?)", value]]).encode()
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {self._token}"}
        sent = time.monotonic()
        try:
            conn = connections.get(host)
            if conn is None:
                conn = connections[host] = http.client.HTTPConnection(host, timeout=self._timeout_s)
            conn.request("POST", "/db/execute", body, headers)
            resp = conn.getresponse()
            raw = resp.read()
            status = resp.status
            if resp.getheader("Connection", "").lower() == "close":
                connections.pop(host).close()
        except (OSError, http.client.HTTPException):
            stale = connections.pop(host, None)
            if stale is not None:
                stale.close()
            self._fail(Failure(value, time.monotonic(), 0, "no-answer", sent, host))
            return
        now = time.monotonic()
        if status == 200:
            try:
                result = json.loads(raw)["results"][0]
            except (ValueError, KeyError, IndexError, TypeError):
                result = {"error": "unparsable"}
            if "error" not in result:
                ack = Ack(
                    value,
                    sent,
                    now,
                    int(resp.getheader("X-TalentNest-Node") or 0),
                    int(resp.getheader("X-TalentNest-Epoch") or 0),
                )
                with self._lock:
                    self.acks.append(ack)
                return
        try:
            code = str(json.loads(raw).get("code", ""))
        except (ValueError, AttributeError):
            code = ""
        self._fail(Failure(value, now, status, code, sent, host))

    def _fail(self, failure: Failure) -> None:
        with self._lock:
            self.failures.append(failure)
        time.sleep(self._pause_s)


def longest_gap_s(acks: list[Ack], start_s: float, end_s: float) -> float:
    """The longest time without any acknowledgement between start_s and end_s (both ends count as
    acknowledgements, so a load that stalled up to end_s shows the whole stall)."""
    times = sorted([start_s, *(a.acked_s for a in acks if start_s < a.acked_s < end_s), end_s])
    return max(b - a for a, b in itertools.pairwise(times))
