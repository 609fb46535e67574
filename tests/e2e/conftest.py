"""
pytest-twisted tests: the whole program as a user runs it (``twistd -n acexy``
in a subprocess). Run separately from the trial-style suites (STYLE.md
pitfall 22): ``pytest tests/e2e``.

pytest-twisted does not fail a test on logged errors (trial would): here every
test does, through the autouse ``no_logged_failures`` fixture. A test that
expects some is marked ``@pytest.mark.logged_failures(types=[SomeError, ...])``:
failures of those types are allowed, any other still fails it (as trial's
``flushLoggedErrors(SomeError)``). (Positional types work too, but pytest takes
a *single* class given positionally for the thing to decorate: use ``types=``.)
"""

import gc

import pytest
from twisted.logger import globalLogPublisher


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "logged_failures(types=[...]): the test expects logged failures of these exception types"
        " (any other logged failure still fails it)",
    )


def expected_failures(node) -> tuple:
    """The exception types a test's ``logged_failures`` marker allows."""
    marker = node.get_closest_marker("logged_failures")
    if marker is None:
        return ()
    types = []
    for arg in [*marker.args, *marker.kwargs.get("types", ())]:
        types.extend(arg if isinstance(arg, (tuple, list)) else [arg])
    return tuple(types)


@pytest.fixture
def reactor():
    # pytest-twisted installs the reactor but ships no fixture for it.
    from twisted.internet import reactor as _reactor

    return _reactor


@pytest.fixture(autouse=True)
def no_logged_failures(request):
    """Fails the test on any failure logged while it ran (see the module docstring)."""
    expected = expected_failures(request.node)
    failures = []

    def observer(event):
        if event.get("log_failure") is not None:
            failures.append(event["log_failure"])

    def described(found):
        return [f"{f.type.__name__}: {f.getErrorMessage()}" for f in found]

    globalLogPublisher.addObserver(observer)
    gc.collect()  # what earlier tests dropped is reported as theirs, not as this test's
    if failures:
        globalLogPublisher.removeObserver(observer)
        pytest.fail(f"failures logged before this test began (left by an earlier test): {described(failures)}")
    yield failures
    gc.collect()  # surfaces "Unhandled error in Deferred" from dropped Deferreds
    globalLogPublisher.removeObserver(observer)
    unexpected = [f for f in failures if not (expected and f.check(*expected))]
    assert not unexpected, described(unexpected)
