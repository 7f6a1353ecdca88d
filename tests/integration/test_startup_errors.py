"""Start-up failures: bad configuration, no secret, an address without an ID, a port in use → exit 2, said
clearly (configuration problems one line each on stderr, all at once; start-up failures as startup_failed)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.support.cluster import REPO, clean_env, free_port, pick_subnet
from tests.support.dns import TestDnsServer

pytestmark = pytest.mark.integration

SECRET = "s" * 32
EXIT_USAGE = 2


@pytest.fixture
def dns() -> Iterator[TestDnsServer]:
    # Should a node get past its checks, its lookups stay on loopback.
    with TestDnsServer() as server:
        yield server


def run_node(env: dict[str, str], timeout_s: float = 15.0) -> subprocess.CompletedProcess[str]:
    """Run a node that is expected to exit by itself; a node that does not is killed by the timeout."""
    return subprocess.run(
        [sys.executable, "-m", "node"],
        cwd=REPO,
        env=clean_env(env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def json_lines(stdout: str) -> list[dict]:
    """Every stdout line, parsed; fails the test on any line that breaks the log contract."""
    records = []
    for line in stdout.splitlines():
        record = json.loads(line)
        assert {"timestamp", "level", "event", "node_id"} <= record.keys(), line
        records.append(record)
    return records


def test_every_bad_value_is_reported_at_once_one_line_each(dns):
    result = run_node(
        {
            "PORT": "abc",
            "DISCOVERY_INTERVAL": "-1",
            "LOG_LEVEL": "loud",
            "JWT_SECRET": SECRET,
            "DNS_SERVERS": dns.address,
        }
    )
    print(result.stderr)
    assert result.returncode == EXIT_USAGE
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 3, lines
    for line, var in zip(lines, ["PORT", "DISCOVERY_INTERVAL", "LOG_LEVEL"], strict=True):
        assert var in line
    assert "abc" in lines[0] and "-1" in lines[1] and "loud" in lines[2]
    assert result.stdout == ""


def test_relations_between_values_are_checked(dns):
    result = run_node(
        {"PROBE_INTERVAL": "2", "DISCOVERY_INTERVAL": "1", "JWT_SECRET": SECRET, "DNS_SERVERS": dns.address}
    )
    assert result.returncode == EXIT_USAGE
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "PROBE_INTERVAL" in lines[0] and "DISCOVERY_INTERVAL" in lines[0], lines


def test_missing_jwt_secret_is_a_clear_start_up_error(dns):
    result = run_node({"DNS_SERVERS": dns.address})
    print(result.stderr)
    assert result.returncode == EXIT_USAGE
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "JWT_SECRET" in lines[0] and "not set" in lines[0], lines


def test_missing_jwt_secret_is_reported_with_the_other_problems(dns):
    result = run_node({"PORT": "0", "DNS_SERVERS": dns.address})
    assert result.returncode == EXIT_USAGE
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2 and "PORT" in lines[0] and "JWT_SECRET" in lines[1], lines


def test_ipv6_host_without_advertise_address_is_a_clear_start_up_error(dns):
    result = run_node(
        {
            "HOST": "::1",
            "PORT": "3000",
            "JWT_SECRET": SECRET,
            "DNS_SERVERS": dns.address,
            "DNS_TIMEOUT": "0.3",
        }
    )
    print(result.stderr, result.stdout)
    assert result.returncode == EXIT_USAGE
    assert "ADVERTISE_ADDRESS" in result.stderr and "IPv6" in result.stderr
    events = json_lines(result.stdout)
    assert [e["event"] for e in events] == ["startup_failed"]
    assert "ADVERTISE_ADDRESS" in events[0]["reason"]


def test_port_in_use_exits_2_with_startup_failed(dns):
    ip = f"127.0.{pick_subnet()}.2"
    port = free_port([ip])
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind((ip, port))
        taken.listen()
        result = run_node(
            {
                "HOST": ip,
                "ADVERTISE_ADDRESS": ip,
                "PORT": str(port),
                "JWT_SECRET": SECRET,
                "DNS_SERVERS": dns.address,
                "SERVICE_NAME": "nobody.test",
            }
        )
    print(result.stdout, result.stderr)
    assert result.returncode == EXIT_USAGE
    events = json_lines(result.stdout)
    failed = [e for e in events if e["event"] == "startup_failed"]
    assert len(failed) == 1 and failed[0]["level"] == "error"
    assert str(port) in failed[0]["reason"] and failed[0]["port"] == port
    assert "node_started" not in [e["event"] for e in events]
    assert "Traceback" not in result.stderr
