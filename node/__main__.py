"""Command line: ``python -m node`` runs the daemon (console script: ``talentnest-node``).

Exit status: 0 after a clean stop (SIGTERM/SIGINT, also during the wait before a restart), 1 if the node
failed while running and is not restarted in the process (RESTART_ON_CRASH=off, a refusal of what DATA_DIR
holds, or a failure while stopping; see node.runtime.restart), 2 if it could not start (bad configuration, an
address that gives no node ID, a port already in use, DATA_DIR in use by another process). ``recover``
(after the permanent loss of a majority) has its own statuses: see ``node.recover``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, NoReturn

from node import __version__, auth
from node.config import Config, ConfigError
from node.core.ids import Endpoint, InvalidAddress
from node.runtime import logging as nodelog
from node.runtime.clock import LoopClock
from node.runtime.netinfo import detect_advertise_address
from node.runtime.resolver import AiodnsResolver
from node.runtime.restart import run_restarting
from node.runtime.transport import HttpTransport
from node.supervisor import Node

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="talentnest-node", description="Talent Nest cluster node")
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("run", help="run the node (the default); configured from the environment")
    token = sub.add_parser(
        "token", help="print a token signed with JWT_SECRET from the environment (the last line of stdout)"
    )
    token.add_argument("--role", choices=[r.label for r in auth.Role], required=True, help="what it may do")
    token.add_argument("--ttl", type=_ttl, required=True, metavar="SECONDS", help="seconds until it expires")
    token.add_argument(
        "--basic", action="store_true", help="a compact credential for Basic-auth clients (the password)"
    )
    token.add_argument("--subject", default="cli", help="the sub claim of a JWT (default: cli)")
    recover = sub.add_parser(
        "recover",
        help="after the permanent loss of a majority: make this STOPPED node the only voter of a new cluster "
        "that keeps its data (unsafe: may lose the last acknowledged writes); without the confirmation flag "
        "it only prints what it would do",
    )
    recover.add_argument(
        "--data-dir", type=Path, default=None, metavar="DIR",
        help="the node's DATA_DIR (default: the DATA_DIR environment variable)",
    )  # fmt: skip
    recover.add_argument(
        "--yes-i-may-lose-writes", dest="confirmed", action="store_true",
        help="do it: writes acknowledged by the lost nodes but missing here are lost for good",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.command in (None, "run"):
        _exit_now(run_daemon())
    if args.command == "token":
        return print_token(args)
    if args.command == "recover":
        return run_recover(args)
    parser.error(f"unknown command {args.command}")
    return EXIT_USAGE


def _exit_now(code: int) -> NoReturn:
    """End the daemon without the interpreter's teardown. By now every file is closed and durable and the
    log is written out; what is left is freeing every module and object, which takes from a tenth of a
    second to over a second on a busy machine and would eat into the 2 s that SIGTERM-to-exit may take
    (docker stop's grace, a leader's handover included)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


def _ttl(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError("expected a number of seconds") from None
    if not 0 < value <= 10 * 365 * 86400:
        raise argparse.ArgumentTypeError("expected a positive number of seconds, at most ten years")
    return value


def print_token(args: argparse.Namespace) -> int:
    secret = os.environ.get("JWT_SECRET", "")
    if not secret:
        print("talentnest-node: JWT_SECRET is not set; tokens are signed with the nodes' secret", file=sys.stderr)
        return EXIT_USAGE
    role, now = auth.Role.parse(args.role), time.time()
    if args.basic:
        print(auth.mint_compact(secret, role, now=now, ttl_s=args.ttl))
    else:
        print(auth.mint_jwt(secret, role, now=now, ttl_s=args.ttl, subject=args.subject))
    return EXIT_OK


def run_recover(args: argparse.Namespace) -> int:
    """``recover`` (node.recover): plain text on stdout/stderr, no JSON logging, no secret read."""
    from node.recover import recover  # only this command needs it

    data_dir = args.data_dir
    if data_dir is None:
        raw = os.environ.get("DATA_DIR", "")
        if not raw:
            print("talentnest-node recover: give --data-dir DIR (or set DATA_DIR)", file=sys.stderr)
            return EXIT_USAGE
        data_dir = Path(raw)
    return recover(data_dir, confirmed=args.confirmed)


def run_daemon() -> int:
    # Before anything can fail, even reading the configuration: from here on everything printed is a JSON
    # line with secrets redacted (an unexpected exception too), except the documented configuration errors.
    nodelog.configure("info", secret=os.environ.get("JWT_SECRET", ""))
    try:
        try:
            config = Config.from_env()
        except ConfigError as exc:
            for problem in exc.problems:
                print(f"talentnest-node: configuration error: {problem}", file=sys.stderr)
            return EXIT_USAGE
        nodelog.configure(config.log_level, secret=config.jwt_secret)
        tune_gc()
        with asyncio.Runner(loop_factory=event_loop_factory(config.event_loop)) as runner:
            return runner.run(_serve(config))
    finally:
        nodelog.flush()


# CPython collects its youngest generation every 700 net container allocations. A node under write load
# allocates a few dozen per write, almost all freed at once by reference counting, so that was hundreds of
# collections a second: 4-5% of a leader's CPU (bench/replication_profile.py with gc.callbacks timing, 32
# clients), and a tenth of a second per full collection walking every module, class and function loaded
# at start. With these thresholds and the start-up objects frozen out of collection, the same load ran
# about one young collection in ten seconds. Cyclic garbage still goes: every 50,000 allocations.
GC_THRESHOLDS = (50_000, 10, 10)


def tune_gc() -> None:
    """Freeze what start-up made (modules, classes, configuration: kept for the process's life) out of
    the cyclic collector's reach, and collect the youngest generation less often (GC_THRESHOLDS)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def event_loop_factory(wanted: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop when ``wanted`` (EVENT_LOOP, default) and installed (the image has it), else asyncio's
    own (None). ``node_starting`` says which one runs.

    Why: a replicated write crosses the event loop a dozen times on each node (HTTP, the Replicator, the
    stream frames, the log and SQLite threads handing results back). uvloop, a C loop on libuv that
    uvicorn uses by default, makes each crossing cheaper: on this project's benchmark, 10-20% more writes
    per second through the leader. Nothing in the node depends on which loop runs it."""
    if wanted != "uvloop":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


async def _serve(config: Config) -> int:
    # Every log line carries node_id; until the address (and so the ID) is known, it is null.
    log = nodelog.get_logger(node_id=None)
    resolver = AiodnsResolver(config.dns_servers, timeout_s=config.dns_timeout_s)
    try:
        if config.advertise_address:
            address, source = config.advertise_address, "ADVERTISE_ADDRESS"
        else:
            address, source = await detect_advertise_address(
                host=config.host, port=config.port, service_name=config.service_name, resolver=resolver
            )
        me = Endpoint.parse(f"{address}:{config.port}")
    except InvalidAddress as exc:
        log.error("startup_failed", reason=str(exc))
        print(f"talentnest-node: {exc}", file=sys.stderr)
        return EXIT_USAGE
    log = log.bind(node_id=me.node_id)
    nodelog.set_node_id(me.node_id)
    log.info(
        "node_starting", version=__version__, address=me.url, address_source=source, node_id=me.node_id,
        event_loop=type(asyncio.get_running_loop()).__module__.split(".")[0],
    )  # fmt: skip
    if config.weak_secret:
        log.warning(
            "weak_jwt_secret",
            secret_bytes=len(config.jwt_secret.encode()),
            advice="JWT_SECRET is shorter than 32 bytes; tokens can be brute-forced. Use `openssl rand -hex 32`.",
        )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    @contextlib.asynccontextmanager
    async def new_node() -> AsyncIterator[Node]:
        # A peer transport of its own for each Node: a failed Node's connections, signed with its
        # incarnation, are closed with it before the next one starts.
        transport = HttpTransport(secret=config.jwt_secret, probe_timeout_s=config.probe_timeout_s)
        async with transport:
            yield Node(config, me=me, clock=LoopClock(), resolver=resolver, transport=transport, log=log)

    # A node that fails after its start-up completed is built again in this process (RESTART_ON_CRASH,
    # node.runtime.restart): with a plain `docker run` nothing else would start it again.
    return await run_restarting(
        new_node, stop, restart=config.restart_on_crash,
        report=lambda exc, node: _report_failure(exc, node, config, log), log=log,
    )  # fmt: skip


def _report_failure(exc: Exception, node: Any, config: Config, log) -> int:
    errors = list(exc.exceptions) if isinstance(exc, BaseExceptionGroup) else [exc]
    if not node.started.is_set() and all(isinstance(e, OSError) for e in errors):
        # Before start-up completed an OSError is the listening socket: say which, exit as a start-up failure.
        log.error("startup_failed", reason=str(errors[0]), host=config.host, port=config.port)
        return EXIT_USAGE
    for error in errors:
        log.error("node_crashed", error=repr(error), exc_info=error)
    return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
