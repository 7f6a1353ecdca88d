"""The core decides; it must not do I/O, read clocks or draw random numbers. Enforced by its imports."""

import ast
import pathlib

import node.core

FORBIDDEN = {
    "asyncio", "aiohttp", "aiodns", "pycares", "sqlite3", "structlog", "time", "random", "socket",
    "os", "threading", "subprocess", "datetime", "secrets", "urllib", "http", "requests", "orjson", "jwt",
}


def imported_modules(path: pathlib.Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for item in ast.walk(tree):
        if isinstance(item, ast.Import):
            for alias in item.names:
                yield alias.name.split(".")[0], item.lineno
        elif isinstance(item, ast.ImportFrom) and item.module and item.level == 0:
            yield item.module.split(".")[0], item.lineno


def test_core_imports_no_io_clock_or_randomness():
    core = pathlib.Path(node.core.__file__).parent
    files = sorted(core.glob("*.py"))
    assert len(files) >= 3
    offenders = [
        f"{path.name}:{line} imports {module}"
        for path in files
        for module, line in imported_modules(path)
        if module in FORBIDDEN
    ]
    assert offenders == []


def test_the_check_can_fail(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import time\nfrom asyncio import sleep\n")
    assert {m for m, _ in imported_modules(bad)} == {"time", "asyncio"}
