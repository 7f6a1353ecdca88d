"""A request body as aiohttp's handlers see it (a ``StreamReader``), either already whole when the handler
runs (it came with the head) or fed in its chunks at the loop's next turn (it is still arriving)."""

from __future__ import annotations

import asyncio
from unittest import mock

from aiohttp.streams import StreamReader


def arriving_body(chunks: list[bytes], *, arrived: bool) -> StreamReader:
    """The body's stream; must be called on a running loop."""
    reader = StreamReader(mock.Mock(), 1 << 16, loop=asyncio.get_running_loop())

    def feed() -> None:
        for chunk in chunks:
            reader.feed_data(chunk)
        reader.feed_eof()

    if arrived:
        feed()
    else:
        asyncio.get_running_loop().call_soon(feed)
    return reader
