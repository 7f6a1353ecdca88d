"""The daemon's cyclic-collector settings (node.__main__.tune_gc): fewer young collections under load, and
the start-up objects out of every collection's walk. Run in a child interpreter: the settings are global."""

import subprocess
import sys

import node.__main__ as main_module


def test_tune_gc_freezes_start_up_objects_and_raises_the_thresholds():
    code = (
        "import gc; from node.__main__ import tune_gc, GC_THRESHOLDS; before = gc.get_freeze_count(); "
        "tune_gc(); print(before, gc.get_freeze_count(), gc.get_threshold() == GC_THRESHOLDS)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    before, after, thresholds = out.stdout.split()
    assert int(before) == 0 and int(after) > 10_000  # the imported modules' objects, at least
    assert thresholds == "True"
    assert main_module.GC_THRESHOLDS[0] > 700  # CPython's default, which the tuning is for


def test_the_daemon_tunes_the_collector_after_reading_its_configuration(monkeypatch):
    """Once the configuration is valid (a usage error exits without it) and before the event loop starts."""
    calls: list[str] = []

    class Stop(Exception):
        pass

    class FakeConfig:
        log_level = "info"
        jwt_secret = "s" * 32
        event_loop = "asyncio"

    def fake_from_env():
        calls.append("config")
        return FakeConfig()

    def fake_tune():
        calls.append("tune_gc")
        raise Stop

    def fake_runner(*_args, **_kwargs):
        calls.append("loop")
        raise AssertionError("the loop started before the collector was tuned")

    monkeypatch.setattr(main_module.nodelog, "configure", lambda *_a, **_k: None)  # global: left alone
    monkeypatch.setattr(main_module.nodelog, "flush", lambda: None)
    monkeypatch.setattr(main_module.Config, "from_env", staticmethod(fake_from_env))
    monkeypatch.setattr(main_module, "tune_gc", fake_tune)
    monkeypatch.setattr(main_module.asyncio, "Runner", fake_runner)
    try:
        main_module.run_daemon()
    except Stop:
        pass
    assert calls == ["config", "tune_gc"]
