"""HttpApi actor: serves the aiohttp application until told to stop."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from node.http.common import make_error_middleware

# Cap on request bodies for endpoints that do not set their own (the cluster endpoints take tiny JSON).
DEFAULT_MAX_BODY_BYTES = 1 << 20


class HttpApi:
    def __init__(self, *, host: str, port: int, log: Any, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES):
        self._host = host
        self._port = port
        self._log = log
        self.app = web.Application(
            middlewares=[make_error_middleware(log)], client_max_size=max_body_bytes, handler_args={}
        )
        self._runner: web.AppRunner | None = None
        self.ready = asyncio.Event()

    async def start(self) -> None:
        """Bind and start serving; raises OSError if the address is taken."""
        self._runner = web.AppRunner(
            self.app, access_log=None, handle_signals=False, shutdown_timeout=0.5
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port, reuse_address=True)
        await site.start()
        self.ready.set()
        self._log.info("http_listening", host=self._host, port=self._port)

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
