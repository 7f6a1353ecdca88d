"""The fault suite's fixtures (the engine and the image come from the e2e suite) and its report.

Every fault's verdict is collected here, printed as one table at the end of the run ("fault suite") and saved
as JSON with each fault's history in ``$FAULTS_REPORT_DIR`` (default ``.faults/`` in the checkout).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from node.check import report
from tests.e2e.conftest import _needs_engine, docker, image, timings  # noqa: F401 - fixtures, shared
from tests.e2e.support import ROOT
from tests.faults.harness import FaultCluster, wait_for

ROWS: list[tuple[str, dict[str, Any]]] = []


def report_dir() -> Path:
    return Path(os.environ.get("FAULTS_REPORT_DIR") or ROOT / ".faults")


def keep_evidence(cluster: FaultCluster, fault: str, contents: dict[str, Any]) -> None:
    """Each node's log (``<fault>.<container>.log``) and the contents each node's copy held at the end
    (``<fault>.contents.json``) into the report folder; best effort: a node gone says so in its file."""
    folder = report_dir()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{fault}.contents.json").write_text(json.dumps(contents, indent=1, sort_keys=True, default=str))
    for name in cluster.slots.values():
        result = cluster.docker("logs", name, check=False)
        text = result.stdout + result.stderr if result.returncode == 0 else f"docker logs failed: {result.stderr}"
        (folder / f"{fault}.{name}.log").write_text(text)


def record(fault: str, verdict: dict[str, Any], history_jsonl: str) -> None:
    ROWS.append((fault, verdict))
    folder = report_dir()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{fault}.history.jsonl").write_text(history_jsonl)
    (folder / "report.json").write_text(json.dumps(dict(ROWS), indent=2, sort_keys=True) + "\n")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not ROWS:
        return
    terminalreporter.section("fault suite")
    for line in report.table(ROWS).splitlines():
        terminalreporter.write_line(line)
    terminalreporter.write_line(f"(details and histories: {report_dir()})")


@pytest.fixture(scope="module")
def trio(docker, image) -> Iterator[FaultCluster]:  # noqa: F811 - the imported fixtures
    """Three nodes (slots 1-3, slot 3 the highest ID), formed and healthy; shared by a module's faults."""
    cluster = FaultCluster(docker, image)
    try:
        cluster.create_network()
        for slot in (1, 2, 3):
            cluster.run(slot)
        wait_for(lambda: cluster.healthy([1, 2, 3]) is None, 90, "three voters, the highest writable")
        yield cluster
    finally:
        cluster.destroy()
