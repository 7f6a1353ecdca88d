"""PID 1 of the container image: runs the node, and stops cleanly even when told to before it is ready.

The kernel ignores signals sent to PID 1 for which the process has no handler. The node installs its
SIGTERM handler only once its event loop runs, a few hundred milliseconds after start: a `docker stop` in
that window would be ignored, wait its 10 s and end in SIGKILL (exit status 137). So this script installs
a handler first - a stop before the node is up ends the process at once with status 0 - and then hands
over to the node, whose own handler (goodbye to peers, exit 0 within 2 s) replaces it. Only the few
milliseconds the interpreter needs to reach the first line remain uncovered.
"""

import os
import signal
import sys


def _stop_before_start(signum: int, frame: object) -> None:
    # Nothing to undo yet: the node has told no peer about itself before its own handler is in place. Exit at
    # once rather than raise SystemExit, which could land inside a half-done import of a C extension.
    os._exit(0)


signal.signal(signal.SIGTERM, _stop_before_start)
signal.signal(signal.SIGINT, _stop_before_start)

from node.__main__ import main  # noqa: E402 - after the handlers, on purpose

sys.exit(main())
