import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]
import util  # noqa: E402


@pytest.fixture(autouse=True)
def stated_precision(request):
    """Every test runs at the precision and layout it states (tests/util.py: runs_at), as under test_all.py."""
    with util.pinned(request.function):
        yield
