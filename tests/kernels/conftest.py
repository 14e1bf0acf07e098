"""The kernel tests' shared fixture: every backend usable on this machine's CPU."""

import pytest
from oracle_checks import BACKENDS


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Runs the test once per backend, chosen through DLER_BACKEND as a user would."""
    monkeypatch.setenv("DLER_BACKEND", request.param)
    return request.param
