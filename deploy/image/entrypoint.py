"""The node's first Python lines in the image: a stop before the node is ready still ends it cleanly.

tini (PID 1, see the Containerfile) forwards ``docker stop``'s SIGTERM to this process from its first
instant. The node installs its own SIGTERM handler only once its event loop runs, a few hundred
milliseconds after start; before that, Python's default would end the process by the signal (status 143,
which tini reports as 0). This script installs a handler first, so a stop before the node is up ends the
process at once with status 0 and nothing half done, and then hands over to the node, whose own handler
(goodbye to peers, a leader's handover, exit 0 within 2 s) replaces it.
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
