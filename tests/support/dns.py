"""A small authoritative DNS server for tests: answers A queries from a dict the test edits.

It answers like Docker's embedded DNS (TTL 600 by default), so a resolver that caches by TTL would be caught
returning stale answers.
"""

from __future__ import annotations

import threading

from dnslib import QTYPE, RCODE, RR, A, DNSError
from dnslib.server import BaseResolver, DNSLogger, DNSServer

ANSWER, SERVFAIL, SILENT = "answer", "servfail", "silent"


class _Resolver(BaseResolver):
    def __init__(self, owner: TestDnsServer) -> None:
        self.owner = owner

    def resolve(self, request, handler):
        reply = request.reply()
        name = str(request.q.qname).rstrip(".").lower()
        with self.owner.lock:
            self.owner.queries += 1
            hosts = self.owner.names.get(name)
            mode = self.owner.mode
        if mode == SILENT:
            raise DNSError("test server is silent")  # dnslib sends nothing back: the client times out
        if mode == SERVFAIL:
            reply.header.rcode = RCODE.SERVFAIL
        elif hosts is None:
            reply.header.rcode = RCODE.NXDOMAIN
        elif request.q.qtype in (QTYPE.A, QTYPE.ANY):
            for host in hosts:
                reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(host), ttl=self.owner.ttl))
        return reply


class TestDnsServer:
    __test__ = False  # not a pytest class

    def __init__(self, host: str = "127.0.0.1", ttl: int = 600) -> None:
        self.names: dict[str, list[str]] = {}
        self.ttl = ttl
        self.queries = 0
        # ANSWER: answer from ``names``; SERVFAIL: answer every query with SERVFAIL; SILENT: drop every query.
        self.mode = ANSWER
        self.lock = threading.Lock()
        self._server = DNSServer(
            _Resolver(self), port=0, address=host, logger=DNSLogger(log="-request,-reply,-truncated,-error")
        )

    @property
    def address(self) -> str:
        host, port = self._server.server.server_address[:2]
        return f"{host}:{port}"

    def set(self, name: str, hosts: list[str] | None) -> None:
        with self.lock:
            if hosts is None:
                self.names.pop(name, None)
            else:
                self.names[name] = list(hosts)

    def set_mode(self, mode: str) -> None:
        if mode not in (ANSWER, SERVFAIL, SILENT):
            raise ValueError(f"unknown mode {mode!r}")
        with self.lock:
            self.mode = mode

    def query_count(self) -> int:
        with self.lock:
            return self.queries

    def __enter__(self) -> TestDnsServer:
        self._server.start_thread()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop()
        self._server.server.server_close()
