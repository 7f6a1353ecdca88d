import pytest
import structlog


@pytest.fixture
def captured_logs():
    """Every log event emitted during the test, as dicts (structlog.testing.capture_logs)."""
    with structlog.testing.capture_logs() as logs:
        yield logs
