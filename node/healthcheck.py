"""Container health check: ``python -m node.healthcheck`` exits 0 if this node's /cluster/health answers 200.

Standard library only and no import of the node itself, so it starts in a few tens of milliseconds and works
in an image without curl. It asks 127.0.0.1 on ``PORT`` (default 3000), as the HEALTHCHECK, a Kubernetes
exec probe or an operator inside the container would. Exit status: 0 healthy, 1 not (reason on stderr).
"""

from __future__ import annotations

import http.client
import os
import sys

DEFAULT_PORT = 3000
TIMEOUT_S = 2.0


def check(port: int, timeout_s: float = TIMEOUT_S) -> tuple[bool, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        conn.request("GET", "/cluster/health", headers={"Connection": "close"})
        response = conn.getresponse()
        body = response.read(4096).decode("utf-8", "replace").strip()
    except (OSError, http.client.HTTPException) as exc:
        return False, f"no answer on 127.0.0.1:{port}: {exc}"
    finally:
        conn.close()
    if response.status != 200:
        return False, f"HTTP {response.status}: {body}"
    return True, body


def main() -> int:
    raw = os.environ.get("PORT", "").strip() or str(DEFAULT_PORT)
    if not raw.isdigit() or not 1 <= int(raw) <= 65535:
        print(f"healthcheck: PORT={raw!r} is not a TCP port", file=sys.stderr)
        return 1
    healthy, detail = check(int(raw))
    print(detail, file=sys.stdout if healthy else sys.stderr)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
