"""Fixtures shared by test modules."""

import pytest


@pytest.fixture(scope="module")
def cl():
    """The curvlinops package (skips the tests that use it when it is missing)."""
    return pytest.importorskip("curvlinops")
