"""
pytest-twisted tests: the whole program as a user runs it (``twistd -n acexy``
in a subprocess). Run separately from the trial-style suites (STYLE.md
pitfall 22): ``pytest tests/e2e``.
"""

import gc

import pytest
from twisted.logger import globalLogPublisher


@pytest.fixture
def reactor():
    # pytest-twisted installs the reactor but ships no fixture for it.
    from twisted.internet import reactor as _reactor

    return _reactor


@pytest.fixture
def no_logged_failures():
    """pytest-twisted does not fail on logged errors (trial would): this does."""
    failures = []

    def observer(event):
        if event.get("log_failure") is not None:
            failures.append(event["log_failure"])

    globalLogPublisher.addObserver(observer)
    yield failures
    gc.collect()  # surfaces "Unhandled error in Deferred" from dropped Deferreds
    globalLogPublisher.removeObserver(observer)
    assert not failures, [f.getErrorMessage() for f in failures]
