"""Structured logs: one JSON object per line on stdout, nothing else there.

Every line has ``timestamp`` (ISO 8601, UTC), ``level``, ``event`` (a fixed name per kind of fact, listed in
the README) and ``node_id`` (bound by the node at start).

Writing to stdout can block (a full pipe to a slow log driver), and the event loop must never block, so
lines go through a bounded queue to a writer thread. When the queue is full the line is dropped and counted;
the next line that gets through carries ``log_lines_dropped`` so the gap is visible.
"""

from __future__ import annotations

import queue
import sys
import threading
from typing import IO, Any

import orjson
import structlog

_QUEUE_LINES = 10_000


class _ThreadedLineWriter:
    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=_QUEUE_LINES)
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)
        self._thread.start()

    def write(self, line: bytes) -> None:
        try:
            self._queue.put_nowait(line)
        except queue.Full:
            self.dropped += 1

    def close(self, timeout_s: float = 1.0) -> None:
        try:
            self._queue.put(None, timeout=timeout_s)
        except queue.Full:
            return
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while (line := self._queue.get()) is not None:
            try:
                self._stream.write(line + b"\n")
                if self._queue.empty():
                    self._stream.flush()
            except (OSError, ValueError):
                self.dropped += 1


class _Logger:
    """structlog logger that hands rendered bytes to the writer thread."""

    def __init__(self, writer: _ThreadedLineWriter) -> None:
        self._writer = writer

    def msg(self, message: bytes) -> None:
        self._writer.write(message)

    log = debug = info = warn = warning = error = critical = exception = fatal = msg


_writer: _ThreadedLineWriter | None = None


def _count_drops(_: Any, __: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    if _writer is not None and _writer.dropped:
        event_dict["log_lines_dropped"] = _writer.dropped
        _writer.dropped = 0
    return event_dict


_FIRST_KEYS = ("timestamp", "level", "event", "node_id")


def _order_keys(_: Any, __: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """Put the standard keys first so a line reads well even without jq."""
    ordered = {k: event_dict.pop(k) for k in _FIRST_KEYS if k in event_dict}
    ordered.update(event_dict)
    return ordered


def configure(level: str = "info", stream: IO[bytes] | None = None) -> None:
    """Route structlog to JSON lines on ``stream`` (default: stdout)."""
    global _writer
    if _writer is not None:
        _writer.close()
    _writer = _ThreadedLineWriter(stream or sys.stdout.buffer)
    writer = _writer
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
            structlog.processors.dict_tracebacks,
            _count_drops,
            _order_keys,
            structlog.processors.JSONRenderer(serializer=orjson.dumps),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=lambda *_: _Logger(writer),
        cache_logger_on_first_use=True,
    )


def flush() -> None:
    """Write out every queued line (called once, at exit)."""
    global _writer
    if _writer is not None:
        _writer.close()
        _writer = None


def get_logger(**bound: Any) -> Any:
    return structlog.get_logger().bind(**bound)
