"""Memory of a node while clients ask for large results and never read them: peak and after RSS.

Not a test: it asserts nothing and prints figures. It starts its own node (127.0.0.78, DATA_DIR in a
temporary directory), creates a table of ``--rows`` rows of ``--width`` characters (10,000 x 1,500: a 15 MB
answer), then for each count in ``--clients`` opens that many connections that send
``GET /db/query?q=SELECT * FROM big`` with a tiny receive buffer and read nothing for ``--hold`` seconds,
then leave. Printed per phase: the node's RSS before, its peak while the clients held (VmHWM, reset per
phase is not possible, so the running maximum of samples every 50 ms is shown too), and after they left
(once RSS stopped falling, at most ``--settle`` seconds), plus how many got 200 and how many 503 busy.

    .venv/bin/python bench/slow_readers.py [--clients 8 60] [--hold 5] [--env MALLOC_ARENA_MAX=2]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from node import auth  # noqa: E402

BENCH_SECRET = "bench-secret-bench-secret-bench-secret-0123"
HOST = "127.0.0.78"
CLIENT_SOURCE = "127.0.0.79"  # not 127.0.0.1: ordinary clients, not the loopback slice


def rss_mib(pid: int, key: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{key} not in /proc/{pid}/status")


def start_node(data_dir: str, extra_env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "HOST": HOST,
        "ADVERTISE_ADDRESS": HOST,
        "PORT": str(port),
        "JWT_SECRET": BENCH_SECRET,
        "DATA_DIR": data_dir,
        "SERVICE_NAME": "bench.invalid",
        "DNS_SERVERS": "127.0.0.1:9",
        "LOG_LEVEL": "warning",
        **extra_env,
    }
    process = subprocess.Popen([sys.executable, "-m", "node"], env=env, stdout=subprocess.DEVNULL)
    return process, f"http://{HOST}:{port}"


def call(url: str, token: str, path: str, body: object | None = None, timeout_s: float = 60) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"{url}{path}", data=data, headers={"Authorization": f"Bearer {token}"})
    if data is not None:
        req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        return json.loads(resp.read())


def wait_ready(url: str) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise SystemExit("node not ready within 20 s")


def silent_client(url: str, token: str) -> socket.socket:
    parsed = urllib.parse.urlsplit(url)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.bind((CLIENT_SOURCE, 0))
    sock.connect((parsed.hostname, parsed.port))
    query = urllib.parse.quote("SELECT * FROM big")
    sock.sendall(
        f"GET /db/query?q={query} HTTP/1.1\r\nHost: {parsed.hostname}\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
    )
    return sock


def status_of(sock: socket.socket) -> str:
    sock.settimeout(0.5)
    try:
        head = sock.recv(16)
    except OSError:
        return "none"
    return head[9:12].decode() if head.startswith(b"HTTP/1.1 ") else "none"


def settle(pid: int, max_s: float) -> float:
    """RSS once it stopped falling (two samples 0.5 s apart within 1 MiB), at most ``max_s`` seconds."""
    last = rss_mib(pid)
    deadline = time.monotonic() + max_s
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = rss_mib(pid)
        if abs(now - last) < 1:
            return now
        last = now
    return last


def phase(pid: int, url: str, token: str, clients: int, hold_s: float, settle_s: float) -> dict:
    before = rss_mib(pid)
    socks = [silent_client(url, token) for _ in range(clients)]
    peak = before
    deadline = time.monotonic() + hold_s
    while time.monotonic() < deadline:
        peak = max(peak, rss_mib(pid))
        time.sleep(0.05)
    statuses: dict[str, int] = {}
    for sock in socks:
        code = status_of(sock)
        statuses[code] = statuses.get(code, 0) + 1
        sock.close()
    after = settle(pid, settle_s)
    return {
        "clients": clients,
        "before": before,
        "peak": peak,
        "hwm": rss_mib(pid, "VmHWM"),
        "after": after,
        "statuses": statuses,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[8, 60])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--width", type=int, default=1_500)
    parser.add_argument("--hold", type=float, default=5.0, help="seconds the clients stay without reading")
    parser.add_argument("--settle", type=float, default=15.0, help="most seconds to wait for RSS to settle")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="extra node setting")
    args = parser.parse_args()
    extra = dict(item.split("=", 1) for item in args.env)
    tmp = tempfile.TemporaryDirectory(prefix="slow-readers-")
    process, url = start_node(tmp.name, extra)
    token = auth.mint_jwt(BENCH_SECRET, auth.Role.WRITE, now=time.time(), ttl_s=3600, subject="bench")
    try:
        wait_ready(url)
        call(url, token, "/db/execute", ["CREATE TABLE big (id INTEGER PRIMARY KEY, v TEXT)"])
        half = (args.width + 1) // 2
        fill = (
            f"WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c WHERE n < {args.rows}) "
            f"INSERT INTO big(id, v) SELECT n, substr(n || replace(hex(zeroblob({half})), '0', 'x'), 1, {args.width}) "
            "FROM c"
        )
        result = call(url, token, "/db/execute", [fill])
        print(
            f"slow readers against {url} ({args.rows} rows x {args.width} chars); settings {extra or 'default'}"
        )
        print(f"fill: {result['results'][0]}")
        print(f"{'clients':>7} {'before MiB':>10} {'peak MiB':>9} {'HWM MiB':>8} {'after MiB':>9}  statuses")
        for clients in args.clients:
            r = phase(process.pid, url, token, clients, args.hold, args.settle)
            print(
                f"{r['clients']:>7} {r['before']:>10.1f} {r['peak']:>9.1f} {r['hwm']:>8.1f} {r['after']:>9.1f}  "
                f"{r['statuses']}"
            )
    finally:
        process.terminate()
        process.wait(timeout=10)
        tmp.cleanup()


if __name__ == "__main__":
    main()
