from pathlib import Path

import pytest

from node.config import Config, ConfigError

SECRET = {"JWT_SECRET": "x" * 32}


def test_defaults_match_the_documentation():
    config = Config.from_env(SECRET)
    assert config.service_name == "backend-service"
    assert config.port == 3000
    assert config.discovery_interval_s == 10
    assert config.node_timeout_s == 30
    assert config.host == "0.0.0.0"
    assert config.advertise_address is None
    assert config.dns_servers == ()
    assert config.data_dir == Path("data")
    assert not config.weak_secret


def test_every_bad_value_is_reported_at_once():
    env = {**SECRET, "PORT": "abc", "DISCOVERY_INTERVAL": "-1", "LOG_LEVEL": "loud", "DNS_SERVERS": "x:y"}
    with pytest.raises(ConfigError) as info:
        Config.from_env(env)
    problems = info.value.problems
    assert len(problems) == 4
    assert any(p.startswith("PORT='abc'") for p in problems)
    assert any(p.startswith("DISCOVERY_INTERVAL='-1'") for p in problems)
    assert any(p.startswith("LOG_LEVEL='loud'") for p in problems)
    assert any(p.startswith("DNS_SERVERS='x:y'") for p in problems)


def test_missing_secret_is_an_error_and_short_secret_is_weak():
    with pytest.raises(ConfigError) as info:
        Config.from_env({})
    assert "JWT_SECRET is not set" in info.value.problems[0]
    assert Config.from_env({"JWT_SECRET": "secret_key"}).weak_secret


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"ADVERTISE_ADDRESS": "::1"}, "IPv4"),
        ({"DNS_SERVERS": "127.0.0.11,10.0.0.1:99999"}, "invalid port"),
        ({"PORT": "70000"}, "1 to 65535"),
        ({"NODE_TIMEOUT": "nan"}, "finite"),
        ({"FAILURE_THRESHOLD": "0"}, "at least 1"),
        ({"SERVICE_NAME": "bad name!"}, "DNS name"),
        ({"HOST": "localhost"}, "IP address"),
    ],
)
def test_each_parser_says_what_it_expects(env, needle):
    with pytest.raises(ConfigError) as info:
        Config.from_env({**SECRET, **env})
    assert needle in str(info.value)


def test_relations_name_every_field_involved():
    with pytest.raises(ConfigError) as info:
        Config.from_env({**SECRET, "NODE_TIMEOUT": "1", "PROBE_INTERVAL": "0.5", "FAILURE_THRESHOLD": "3"})
    assert "NODE_TIMEOUT" in str(info.value) and "FAILURE_THRESHOLD" in str(info.value)
    with pytest.raises(ConfigError) as info:
        Config.from_env({**SECRET, "DISCOVERY_INTERVAL": "0.2"})
    assert "PROBE_INTERVAL must be shorter than DISCOVERY_INTERVAL" in str(info.value)


def test_dns_servers_accept_ip_and_ip_port():
    config = Config.from_env({**SECRET, "DNS_SERVERS": "127.0.0.11, 127.0.0.1:5353"})
    assert config.dns_servers == ("127.0.0.11", "127.0.0.1:5353")


def test_a_secret_that_is_not_utf8_is_a_configuration_error_that_does_not_repeat_it():
    # os.environ holds undecodable bytes as lone surrogates (surrogateescape).
    raw = b"\xff\xfe-not-utf8-secret-value".decode("utf-8", "surrogateescape")
    with pytest.raises(ConfigError) as info:
        Config.from_env({"JWT_SECRET": raw})
    assert any("JWT_SECRET is not valid UTF-8" in p for p in info.value.problems)
    assert not any("not-utf8-secret-value" in p for p in info.value.problems)


def test_replication_is_on_by_default_and_takes_on_or_off():
    secret = {"JWT_SECRET": "x" * 32}
    default = Config.from_env(secret)
    assert default.replication == "on" and default.formation_window_s == 5.0
    config = Config.from_env({**secret, "REPLICATION": "ON", "FORMATION_WINDOW": "0"})
    assert config.replication == "on" and config.formation_window_s == 0.0
    opt_out = Config.from_env({**secret, "REPLICATION": " Off "})
    assert opt_out.replication == "off"
    with pytest.raises(ConfigError) as info:
        Config.from_env({**secret, "REPLICATION": "yes", "FORMATION_WINDOW": "-1"})
    assert len(info.value.problems) == 2
    assert any("REPLICATION" in p for p in info.value.problems)
    assert any("FORMATION_WINDOW" in p for p in info.value.problems)


def test_event_loop_is_uvloop_by_default_and_takes_uvloop_or_asyncio():
    assert Config.from_env(SECRET).event_loop == "uvloop"
    assert Config.from_env({**SECRET, "EVENT_LOOP": " AsyncIO "}).event_loop == "asyncio"
    with pytest.raises(ConfigError) as info:
        Config.from_env({**SECRET, "EVENT_LOOP": "trio"})
    assert any("EVENT_LOOP" in p and "'trio'" in p for p in info.value.problems)


def test_the_loop_factory_follows_the_setting_and_falls_back_without_uvloop(monkeypatch):
    import asyncio
    import sys

    from node.__main__ import event_loop_factory

    assert event_loop_factory("asyncio") is None
    uvloop = pytest.importorskip("uvloop")
    factory = event_loop_factory("uvloop")
    assert factory is uvloop.new_event_loop
    loop = factory()
    try:
        assert isinstance(loop, asyncio.AbstractEventLoop) and type(loop).__module__.startswith("uvloop")
    finally:
        loop.close()
    monkeypatch.setitem(sys.modules, "uvloop", None)  # as if it were not installed
    assert event_loop_factory("uvloop") is None


def test_snapshot_transfer_defaults_and_limits():
    default = Config.from_env(SECRET)
    assert default.snapshot_rate_bytes_s == 256 << 20 and default.snapshot_max_sends == 2
    config = Config.from_env({**SECRET, "SNAPSHOT_RATE_BYTES_S": "0", "SNAPSHOT_MAX_SENDS": "5"})
    assert config.snapshot_rate_bytes_s == 0 and config.snapshot_max_sends == 5
    with pytest.raises(ConfigError) as info:
        Config.from_env({**SECRET, "SNAPSHOT_RATE_BYTES_S": "-1", "SNAPSHOT_MAX_SENDS": "0"})
    assert len(info.value.problems) == 2
    with pytest.raises(ConfigError, match="SNAPSHOT_RATE_BYTES_S"):
        Config.from_env({**SECRET, "SNAPSHOT_RATE_BYTES_S": "1000"})
    assert any("SNAPSHOT_RATE_BYTES_S" in p for p in info.value.problems)
    assert any("SNAPSHOT_MAX_SENDS" in p for p in info.value.problems)


def test_restart_on_crash_is_on_by_default_and_takes_on_or_off():
    assert Config.from_env(SECRET).restart_on_crash is True
    assert Config.from_env({**SECRET, "RESTART_ON_CRASH": " OFF "}).restart_on_crash is False
    with pytest.raises(ConfigError) as info:
        Config.from_env({**SECRET, "RESTART_ON_CRASH": "yes"})
    assert info.value.problems == ["RESTART_ON_CRASH='yes': must be 'on' or 'off', not 'yes'"]


def test_write_gather_defaults_to_3_ms_takes_0_to_turn_it_off_and_refuses_long_waits():
    assert Config.from_env(SECRET).write_gather_s == 0.003
    assert Config.from_env({**SECRET, "WRITE_GATHER": "0"}).write_gather_s == 0.0
    assert Config.from_env({**SECRET, "WRITE_GATHER": "0.1"}).write_gather_s == 0.1
    for bad in ("-0.001", "0.5", "nan", "soon"):
        with pytest.raises(ConfigError) as info:
            Config.from_env({**SECRET, "WRITE_GATHER": bad})
        assert [p for p in info.value.problems if "WRITE_GATHER" in p], bad
