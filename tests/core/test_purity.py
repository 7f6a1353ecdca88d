"""The core decides; it must not do I/O, read clocks or draw random numbers. Enforced by its imports.

Checked forms: ``import x.y``, ``from x.y import z``, ``from x import y`` (so ``from node import runtime`` is
seen as node.runtime), and relative imports, which are resolved against node.core: ``from . import x`` stays
inside the core and is fine, ``from .. import x`` / ``from ..runtime import x`` escape it and are refused.
"""

import ast
import pathlib

import pytest

import node.core

FORBIDDEN = {
    "asyncio", "aiohttp", "aiodns", "pycares", "sqlite3", "apsw", "structlog", "time", "random", "socket",
    "os", "threading", "subprocess", "datetime", "secrets", "urllib", "http", "requests", "orjson", "jwt",
    "importlib", "pathlib", "io", "shutil", "tempfile", "signal", "uuid",
}
# The rest of the node is built on the core, never the other way round: these would bring I/O and clocks in.
FORBIDDEN_NODE = ("node.runtime", "node.actors", "node.http", "node.storage", "node.supervisor", "node.__main__")
PACKAGE = "node.core"


def imported_names(path: pathlib.Path, package: str = PACKAGE):
    """Every (absolute dotted name, line, escapes_core) a module imports; ``from a import b`` yields a.b too."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for item in ast.walk(tree):
        if isinstance(item, ast.Import):
            for alias in item.names:
                yield alias.name, item.lineno, False
        elif isinstance(item, ast.ImportFrom):
            if item.level:
                parts = package.split(".")
                base = parts[: len(parts) - (item.level - 1)] if item.level - 1 < len(parts) else []
                module = ".".join([*base, *([item.module] if item.module else [])])
                escapes = item.level > 1
            else:
                module, escapes = item.module or "", False
            yield module, item.lineno, escapes
            for alias in item.names:
                yield f"{module}.{alias.name}", item.lineno, escapes


def violations(path: pathlib.Path, package: str = PACKAGE) -> list[str]:
    found = []
    for name, line, escapes in imported_names(path, package):
        where = f"{path.name}:{line}"
        if escapes:
            found.append(f"{where} imports {name} relatively from outside {package}")
        elif name.split(".")[0] in FORBIDDEN:
            found.append(f"{where} imports {name}")
        elif any(name == f or name.startswith(f + ".") for f in FORBIDDEN_NODE):
            found.append(f"{where} imports {name}")
    return sorted(set(found))


def test_core_imports_no_io_clock_or_randomness():
    core = pathlib.Path(node.core.__file__).parent
    # Subpackages too (node/core/replication/...): the whole core is held to the rule.
    files = sorted(core.rglob("*.py"))
    assert len(files) >= 3 and any(path.parent != core for path in files)
    assert [v for path in files for v in violations(path)] == []


@pytest.mark.parametrize(
    "source",
    [
        "import time\n",
        "from asyncio import sleep\n",
        "import os.path\n",
        "from node.runtime.clock import LoopClock\n",
        "import node.runtime.clock\n",
        "from node import runtime\n",
        "from node.storage import sqlite\n",
        "from node.http.common import json_response\n",
        "from node.actors import health\n",
        "import node.supervisor\n",
        "from node import __main__\n",
        "from ..runtime import clock\n",
        "from ..runtime.clock import LoopClock\n",
        "from .. import errors\n",
        "from ... import anything\n",
        "def f():\n    from node.runtime import clock\n",
        "import importlib\n",
    ],
)
def test_the_check_can_fail(tmp_path, source):
    bad = tmp_path / "bad.py"
    bad.write_text(source)
    assert violations(bad) != [], source


@pytest.mark.parametrize(
    "source",
    [
        "from . import ids\n",
        "from .ids import Endpoint\n",
        "from node.core import peerauth\n",
        "from node import errors\n",
        "import hashlib, hmac\n",
        "from __future__ import annotations\n",
    ],
)
def test_the_check_allows_what_the_core_may_use(tmp_path, source):
    ok = tmp_path / "ok.py"
    ok.write_text(source)
    assert violations(ok) == []
