"""Shared fixtures of the core's unit tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from server.core import Executors


@pytest.fixture
def executors() -> Iterator[Executors]:
    """One thread per pool, closed after the test."""
    pools = Executors(chat_workers=1, slow_workers=1)
    yield pools
    pools.close()
