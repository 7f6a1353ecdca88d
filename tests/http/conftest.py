"""The write fast path and its forwarder run every test on both event loops: the node runs uvloop, whose
transports and callback order differ from asyncio's (the forwarder's first version failed every new
connection under uvloop only, and these tests ran on asyncio's loop alone). The other tests of this
folder keep asyncio's loop."""

from __future__ import annotations

import asyncio

BOTH_LOOPS = frozenset({"test_fast_path.py", "test_fast_forward.py", "test_forwarder.py"})


def pytest_asyncio_loop_factories(config, item):  # noqa: ANN001, ANN201 - pytest-asyncio's hook
    if item.path.name in BOTH_LOOPS:
        import uvloop

        return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}
