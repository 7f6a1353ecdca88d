"""The log pipeline: no traceback locals, secrets redacted everywhere, library logs as bounded JSON lines.

Lines are written to an in-memory stream through the real pipeline (:func:`nodelog.configure`); each test
undoes the configuration (:func:`nodelog.reset`), so the rest of the suite sees structlog's defaults.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import io
import json
import logging
import socket
import subprocess
import sys
import threading
import warnings

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node import auth
from node.core import peerauth
from node.runtime import logging as nodelog
from tests.support.cluster import REPO, clean_env

SECRET = "5b1f0c0e8a7d4e21b2f9a3c6d8e0f1a2b3c4d5e6f708192a3b4c5d6e7f809102"
KEY = peerauth.derive_key(SECRET)
NOW = 1_800_000_000.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Captured:
    """The pipeline configured onto a BytesIO; :meth:`lines` stops the writer and parses what it wrote."""

    def __init__(self, level: str = "info", secret: str = SECRET) -> None:
        self.stream = io.BytesIO()
        self.clock = FakeClock()
        nodelog.configure(level, self.stream, secret=secret, clock=self.clock)

    def raw(self) -> bytes:
        nodelog.flush()
        return self.stream.getvalue()

    def lines(self) -> list[dict]:
        out = []
        for line in self.raw().splitlines():
            record = json.loads(line)  # every line is JSON, or this fails
            assert isinstance(record, dict)
            out.append(record)
        return out


@pytest.fixture
def captured():
    cap = Captured()
    try:
        yield cap
    finally:
        nodelog.reset()


@pytest.fixture
def captured_debug():
    cap = Captured("debug")
    try:
        yield cap
    finally:
        nodelog.reset()


# --- exceptions: no locals, bounded ---------------------------------------------------------------------------


def _check_token(token: str) -> None:
    secret = SECRET  # noqa: F841 - the local a locals-rendering traceback would print
    key = KEY  # noqa: F841
    token.encode("ascii")


def test_exception_locals_never_reach_the_line(captured):
    log = nodelog.get_logger(node_id=7)
    try:
        _check_token("\udcff")
    except UnicodeEncodeError:
        log.exception("request_failed", method="GET", path="/db/query")
    raw = captured.raw()
    assert SECRET.encode() not in raw
    assert KEY.hex().encode() not in raw
    (line,) = [json.loads(x) for x in raw.splitlines()]
    assert line["event"] == "request_failed" and line["level"] == "error" and line["node_id"] == 7
    exception = line["exception"]
    assert exception["type"] == "UnicodeEncodeError"
    assert exception["frames"][-1].endswith(":_check_token")
    assert all(frame.count(":") == 2 for frame in exception["frames"])  # file:line:function, nothing more
    assert '"locals"' not in raw.decode() and set(exception) <= {"type", "message", "frames", "cause"}


def test_exception_message_holding_a_secret_is_redacted(captured):
    token = auth.mint_jwt(SECRET, auth.Role.ADMIN, now=NOW, ttl_s=60)
    try:
        raise ValueError(f"cannot use {SECRET} with {token} or {KEY!r}")
    except ValueError:
        nodelog.get_logger().exception("request_failed")
    raw = captured.raw()
    for needle in (SECRET, token, KEY.hex(), repr(KEY)[2:-1]):
        assert needle.encode() not in raw
    assert b"[redacted]" in raw


def _recurse(n: int) -> None:
    if n == 0:
        raise RecursionError("deep")
    _recurse(n - 1)


def test_rendered_traceback_is_bounded():
    try:
        _recurse(500)
    except RecursionError as exc:
        described = nodelog.describe_exception(exc)
    assert len(described["frames"]) == nodelog.MAX_FRAMES
    assert described["frames_omitted"] == 501 + 1 - nodelog.MAX_FRAMES

    group = ExceptionGroup("many", [ValueError("x" * 10_000) for _ in range(100)])
    described = nodelog.describe_exception(group)
    assert len(described["exceptions"]) < nodelog.MAX_EXCEPTIONS
    assert described["exceptions_omitted"] > 90
    assert len(json.dumps(described)) < 20_000


def test_exception_chain_is_shown_briefly():
    try:
        try:
            raise KeyError("inner")
        except KeyError as inner:
            raise RuntimeError("outer") from inner
    except RuntimeError as exc:
        described = nodelog.describe_exception(exc)
    assert described["type"] == "RuntimeError" and described["cause"]["type"] == "KeyError"


def test_cyclic_causes_terminate():
    a, b = ValueError("a"), ValueError("b")
    a.__cause__, b.__cause__ = b, a
    described = nodelog.describe_exception(a)
    assert described["cause"]["type"] == "ValueError" and "cause" not in described["cause"]


# --- redaction ------------------------------------------------------------------------------------------------


def test_redactor_covers_every_form_of_the_secret_and_the_key():
    redactor = nodelog.Redactor(SECRET)
    jwt_token = auth.mint_jwt(SECRET, auth.Role.WRITE, now=NOW, ttl_s=60)
    compact = auth.mint_compact(SECRET, auth.Role.READ, now=NOW, ttl_s=60)
    secret_values = [
        SECRET,
        KEY.hex(),
        KEY.hex().upper(),
        repr(KEY),
        KEY.decode("latin-1"),
        base64.b64encode(KEY).decode(),
        base64.urlsafe_b64encode(KEY).decode(),
        jwt_token,
        compact,
        # a JWT made with another key is still a credential someone holds
        auth.mint_jwt("another-secret-another-secret-another-secret", auth.Role.READ, now=NOW, ttl_s=60),
        "eyJhbGciOiJub25lIn0.eyJyb2xlIjoiYWRtaW4ifQ.",  # alg none, empty signature
    ]
    for value in secret_values:
        for text in (value, f"x {value} y", f"{value}{value}", f"'{value}'"):
            out = redactor.text(text)
            assert value not in out, (value, out)
            assert "[redacted]" in out


@pytest.mark.parametrize(
    "text",
    [
        "Authorization: Bearer abcdef\r\nHost: x",
        "{'Authorization': 'Basic dXNlcjpwYXNz', 'Host': 'x'}",
        '{"authorization": "Token my-own-token"}',
        "authorization=opaque-thing",
        "X-TalentNest-Peer: t=1800000000,sig=00aa11bb22cc33dd44ee55ff66778899aabbccddeeff00112233445566778899",
        "x-talentnest-peer='garbage-value'",
        "sent Bearer abcdefghijklmnop to the node",
        "sent Basic dXNlcjpwYXNzd29yZA== to the node",
    ],
)
def test_header_values_are_redacted(text):
    out = nodelog.Redactor(SECRET).text(text)
    for fragment in (
        "abcdef",
        "dXNlcjpw",
        "my-own-token",
        "opaque-thing",
        "00aa11bb",
        "garbage-value",
        "abcdefghij",
    ):
        assert fragment not in out, out
    assert "[redacted]" in out


def test_ordinary_text_is_untouched_and_cheap():
    redactor = nodelog.Redactor(SECRET)
    for text in (
        "request_failed",
        "/db/query",
        "http://127.0.0.2:4001",
        "authentication required: token expired",
        "unsupported Authorization scheme; use Bearer or Basic",
        'Bearer realm="talentnest", Basic realm="talentnest"',
        "socket.accept() out of system resource",
    ):
        # The fast path hands back the very same object: one search, no copy.
        assert redactor.text(text) is text


_near_misses = st.sampled_from(
    [
        "eyJ",
        "tn1.",
        "sig=",
        "Authorization",
        "AUTHORIZATION:",
        "x-TalentNest-Peer=",
        "bearer ",
        "BASIC  ",
        "ſ",
        "K",
    ]
)


@settings(max_examples=500, deadline=None)
@given(
    parts=st.lists(
        _near_misses | st.text(max_size=12) | st.text(alphabet="abcdefABCDEF0123456789._-=", max_size=70),
        max_size=8,
    )
)
def test_the_cheap_pre_check_never_skips_a_match(parts):
    """The substring pre-check may say "maybe" too often, never "no" when the full pattern would match."""
    redactor = nodelog.Redactor(SECRET)
    text = "".join(parts)
    if redactor._pattern.search(text) is not None:
        assert redactor._might_hold(text)


def test_nested_values_and_secret_keys_are_redacted():
    redactor = nodelog.Redactor(SECRET)
    token = auth.mint_jwt(SECRET, auth.Role.ADMIN, now=NOW, ttl_s=60)
    event = {
        "event": "something",
        "level": "info",
        "headers": {"Authorization": "anything at all", "Host": "x", SECRET: "key holds it"},
        "items": [1, 2.5, None, True, (token, {"deep": [KEY]}), {SECRET}],
        "blob": KEY,
        "obj": RuntimeError(SECRET),
    }
    out = redactor.event(event)
    rendered = json.dumps(out)  # only JSON types are left
    for needle in (SECRET, token, KEY.hex(), repr(KEY)[2:-1], "anything at all"):
        assert needle not in rendered
    assert out["items"][:4] == [1, 2.5, None, True]
    assert out["headers"]["Host"] == "x"


def test_lone_surrogates_do_not_break_a_line(captured):
    nodelog.get_logger().info("something", path="/db/\udcff\udcfe", header="Bearer \udcff")
    (line,) = captured.lines()
    assert line["path"] == "/db/\\udcff\\udcfe"


def test_values_are_bounded(captured):
    nodelog.get_logger().info("something", big="x" * 1_000_000, many=list(range(100_000)))
    raw = captured.raw()
    assert len(raw) < 3 * nodelog.MAX_VALUE_CHARS + 10 * nodelog.MAX_ITEMS


_secrets = st.text(min_size=1, max_size=64) | st.binary(min_size=16, max_size=64).map(bytes.hex)
_filler = st.text(max_size=40)


def _embed(secret: str):
    """Strategies for values that hide ``secret`` (or a derived form) somewhere, nested."""
    key = peerauth.derive_key(secret)
    forms = st.sampled_from([secret, key.hex(), repr(key)[2:-1], key.decode("latin-1")])
    leaf = st.builds(lambda a, f, b: a + f + b, _filler, forms, _filler)
    return st.recursive(
        leaf | _filler | st.integers() | st.none(),
        lambda inner: (
            st.lists(inner, max_size=4)
            | st.dictionaries(st.text(max_size=6), inner, max_size=4)
            | st.tuples(inner, inner)
        ),
        max_leaves=12,
    )


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (*_strings(k), *_strings(v))]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), secret=_secrets)
def test_random_secrets_in_random_structures_are_always_redacted(data, secret):
    redactor = nodelog.Redactor(secret)
    key = peerauth.derive_key(secret)
    value = data.draw(_embed(secret))
    out = redactor.event({"event": "e", "value": value})
    json.dumps(out)
    # Top-level keys are names the code chose (never redacted); everything under them is data.
    for text in [out["event"], *_strings(out["value"])]:
        # "[redacted]" itself may contain a short secret's characters: look only at what was kept.
        for kept in text.split(nodelog.REDACTED):
            assert secret not in kept
            assert key.hex() not in kept
            assert repr(key)[2:-1] not in kept


@settings(max_examples=200, deadline=None)
@given(
    role=st.sampled_from(list(auth.Role)),
    ttl=st.integers(min_value=1, max_value=10**6),
    secret=st.binary(min_size=16, max_size=48).map(bytes.hex),
    before=_filler,
    after=_filler,
)
def test_any_minted_credential_is_redacted_even_without_the_secret(role, ttl, secret, before, after):
    """The shapes alone catch tokens signed with a secret this redactor was not given."""
    redactor = nodelog.Redactor("")
    for token in (
        auth.mint_jwt(secret, role, now=NOW, ttl_s=ttl),
        auth.mint_compact(secret, role, now=NOW, ttl_s=ttl),
    ):
        out = redactor.text(f"{before}{token}{after}")
        assert all(token not in kept for kept in out.split(nodelog.REDACTED))


# --- rate limiter ---------------------------------------------------------------------------------------------


def test_rate_limiter_admits_one_per_window_and_counts_the_rest():
    clock = FakeClock()
    limiter = nodelog.RateLimiter(window_s=10.0, clock=clock)
    assert limiter.admit("a") == 0
    assert [limiter.admit("a") for _ in range(5)] == [None] * 5
    assert limiter.admit("b") == 0  # another kind has its own window
    clock.now += 10.0
    assert limiter.admit("a") == 5
    assert limiter.admit("a") is None
    assert limiter.held_back() == [("a", 1)]
    assert limiter.held_back() == []


def test_rate_limiter_keys_are_bounded():
    clock = FakeClock()
    limiter = nodelog.RateLimiter(window_s=10.0, max_keys=4, clock=clock)
    admitted = sum(limiter.admit(i) is not None for i in range(1000))
    assert admitted == 4  # three own keys, then one overflow key shared by the other 997
    assert len(limiter._slots) <= 4
    clock.now += 10.0
    assert limiter.admit("new") == 0  # idle keys are forgotten to make room


# --- standard library logging ---------------------------------------------------------------------------------


def _accept_failures(n: int) -> None:
    """asyncio's own report of accept() failing with EMFILE (selector_events), through its default handler."""
    loop = asyncio.new_event_loop()
    sock = socket.socket()
    try:
        for _ in range(n):
            loop.call_exception_handler(
                {
                    "message": "socket.accept() out of system resource",
                    "exception": OSError(errno.EMFILE, "Too many open files"),
                    "socket": sock,
                }
            )
    finally:
        sock.close()
        loop.close()


def test_asyncio_flood_is_bounded_and_counted(captured, capfd):
    flood, step_s = 10_000, 0.01  # 100 s of fake time: ten windows
    loop = asyncio.new_event_loop()
    sock = socket.socket()
    try:
        for _ in range(flood):
            loop.call_exception_handler(
                {
                    "message": "socket.accept() out of system resource",
                    "exception": OSError(errno.EMFILE, "Too many open files"),
                    "socket": sock,
                }
            )
            captured.clock.now += step_s
    finally:
        sock.close()
        loop.close()
    lines = captured.lines()
    errors = [x for x in lines if x["event"] == "asyncio_error"]
    assert 1 <= len(errors) <= flood * step_s / nodelog.RATE_WINDOW_S + 1
    first = errors[0]
    assert first["level"] == "error" and first["logger"] == "asyncio"
    assert first["message"].startswith("socket.accept() out of system resource")
    assert first["exception"]["type"] == "OSError" and "Too many open files" in first["exception"]["message"]
    assert "node_id" in first and "timestamp" in first
    # Nothing lost without a trace: every record was written or counted.
    summary = sum(x["suppressed"] for x in lines if x["event"] == "log_suppressed")
    assert len(errors) + sum(x.get("suppressed", 0) for x in errors) + summary == flood
    out, err = capfd.readouterr()
    assert err == "" and out == ""


def test_flood_within_one_window_is_one_line(captured):
    _accept_failures(10_000)
    lines = captured.lines()
    assert len([x for x in lines if x["event"] == "asyncio_error"]) == 1
    assert [x["suppressed"] for x in lines if x["event"] == "log_suppressed"] == [9_999]


def test_repeated_request_failures_are_bounded(captured):
    log = nodelog.get_logger()
    for _ in range(1000):
        try:
            _check_token("\udcff")
        except UnicodeEncodeError:
            log.exception("request_failed", path="/db/query")
    assert len([x for x in captured.lines() if x["event"] == "request_failed"]) == 1


def test_client_aborts_are_debug_without_traceback(captured_debug):
    from aiohttp import ClientConnectionResetError
    from aiohttp.http_exceptions import BadHttpMessage, ContentEncodingError
    from aiohttp.web_protocol import RequestPayloadError

    wrapped = RuntimeError("while reading")
    wrapped.__cause__ = ContentEncodingError("gzip")
    server = logging.getLogger("aiohttp.server")
    client_errors = (
        ClientConnectionResetError("Cannot write to closing transport"),
        BadHttpMessage("bad header"),
        RequestPayloadError("Can not decode content-encoding: gzip"),
        wrapped,
    )
    for exc in client_errors:
        try:
            raise exc
        except (ClientConnectionResetError, BadHttpMessage, RequestPayloadError, RuntimeError):
            server.exception("Error handling request from %s", "127.0.0.1")
        captured_debug.clock.now += (
            nodelog.RATE_WINDOW_S
        )  # the same record again is held back within a window
    lines = [x for x in captured_debug.lines() if x.get("logger") == "aiohttp.server"]
    assert [x["level"] for x in lines] == ["debug"] * len(client_errors)
    assert all("frames" not in x["exception"] for x in lines)
    assert lines[0]["event"] == "aiohttp_server_log"


def test_a_bug_raised_while_handling_a_hang_up_stays_an_error(captured):
    try:
        try:
            raise ConnectionResetError("peer hung up")
        except ConnectionResetError:
            raise KeyError("bug in the cleanup") from None
    except KeyError:
        logging.getLogger("aiohttp.server").exception("Unhandled exception")
    (line,) = captured.lines()
    assert line["level"] == "error" and line["exception"]["frames"]


def test_client_aborts_are_silent_at_info(captured):
    from aiohttp import ClientConnectionResetError

    try:
        raise ClientConnectionResetError("Cannot write to closing transport")
    except ClientConnectionResetError:
        logging.getLogger("aiohttp.server").exception("Unhandled exception")
    assert captured.lines() == []


def test_library_errors_become_json_with_fixed_names(captured, capfd):
    try:
        raise RuntimeError(f"handler broke near {SECRET}")
    except RuntimeError:
        logging.getLogger("aiohttp.server").exception("Error handling request from %s", "10.0.0.1")
    logging.getLogger("aiohttp.web").warning("something odd: Authorization: Bearer abcdefgh")
    logging.getLogger("some.library").error("it failed")
    logging.getLogger("aiohttp.client").info("below warning, at info: written")
    logging.getLogger("aiohttp.client").debug("below the level: dropped")
    lines = captured.lines()
    assert [x["event"] for x in lines] == [
        "aiohttp_server_error",
        "aiohttp_web_warning",
        "library_error",
        "aiohttp_client_log",
    ]
    assert SECRET not in json.dumps(lines) and "abcdefgh" not in json.dumps(lines)
    assert lines[0]["exception"]["type"] == "RuntimeError"
    assert capfd.readouterr() == ("", "")


def test_warnings_threads_and_unraisable_go_to_the_log(captured, capfd):
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn(f"careful with {SECRET}", UserWarning, stacklevel=1)

    def fail():
        secret = SECRET  # noqa: F841
        raise ValueError("thread broke")

    thread = threading.Thread(target=fail, name="worker")
    thread.start()
    thread.join(5)

    class Broken:
        def __del__(self):
            raise KeyError(SECRET)

    Broken()
    lines = captured.lines()
    events = [x["event"] for x in lines]
    assert "python_warning_warning" in events
    assert "thread_failed" in events
    assert "unraisable_warning" in events
    assert SECRET not in json.dumps(lines)
    assert capfd.readouterr() == ("", "")


def test_reset_restores_the_interpreter():
    before = (logging.getLogger().handlers[:], threading.excepthook)
    cap = Captured()
    assert any(isinstance(h, nodelog.StdlibBridge) for h in logging.getLogger().handlers)
    nodelog.reset()
    assert not any(isinstance(h, nodelog.StdlibBridge) for h in logging.getLogger().handlers)
    assert threading.excepthook is before[1]
    assert cap.stream.getvalue() == b""


_CRASHING_PROGRAM = """
import threading, warnings
from node.runtime import logging as nodelog

nodelog.configure("info", secret={secret!r})

def worker():
    secret = {secret!r}
    raise ValueError("worker saw " + secret)

thread = threading.Thread(target=worker)
thread.start()
thread.join()
warnings.warn("about " + {secret!r})

def main():
    secret = {secret!r}
    raise RuntimeError("main saw " + secret)

main()
"""


def test_an_uncaught_exception_is_a_json_line_and_stderr_stays_empty(tmp_path):
    """A separate interpreter, because the hooks matter at exit: nothing plain-text, nothing secret."""
    result = subprocess.run(
        [sys.executable, "-c", _CRASHING_PROGRAM.format(secret=SECRET)],
        cwd=REPO,
        env=clean_env(),
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr == b""
    assert SECRET.encode() not in result.stdout and KEY.hex().encode() not in result.stdout
    events = [json.loads(line)["event"] for line in result.stdout.splitlines()]
    assert events == ["thread_failed", "python_warning_warning", "uncaught_exception"]
