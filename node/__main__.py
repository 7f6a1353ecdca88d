"""Command line: ``python -m node`` runs the daemon (console script: ``talentnest-node``).

Exit status: 0 after a clean stop (SIGTERM/SIGINT), 1 if the node failed while running, 2 if it could not
start (bad configuration, an address that gives no node ID, a port already in use).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from node import __version__
from node.config import Config, ConfigError
from node.core.ids import Endpoint, InvalidAddress
from node.runtime import logging as nodelog
from node.runtime.clock import LoopClock
from node.runtime.netinfo import detect_advertise_address
from node.runtime.resolver import AiodnsResolver
from node.runtime.transport import HttpTransport
from node.supervisor import Node

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="talentnest-node", description="Talent Nest cluster node")
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("run", help="run the node (the default); configured from the environment")
    args = parser.parse_args(argv)
    if args.command in (None, "run"):
        return run_daemon()
    parser.error(f"unknown command {args.command}")
    return EXIT_USAGE


def run_daemon() -> int:
    try:
        config = Config.from_env()
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"talentnest-node: configuration error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    nodelog.configure(config.log_level)
    try:
        return asyncio.run(_serve(config))
    finally:
        nodelog.flush()


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
    log.info("node_starting", version=__version__, address=me.url, address_source=source, node_id=me.node_id)
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

    async with HttpTransport(probe_timeout_s=config.probe_timeout_s) as transport:
        node = Node(config, me=me, clock=LoopClock(), resolver=resolver, transport=transport, log=log)
        try:
            await node.run(stop)
        except Exception as exc:  # noqa: BLE001 - the node failed: report it and exit non-zero
            return _report_failure(exc, node, config, log)
    return EXIT_OK


def _report_failure(exc: Exception, node: Node, config: Config, log) -> int:
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
