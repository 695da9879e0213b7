"""Admission: places in total and per adapter, given back on every path; summaries nest."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.names import BASE_NAME
from server.adapters import AdapterVersion
from server.core.admission import Admission
from server.errors import ConcurrencyLimitError

ALPHA = AdapterVersion("alpha", 1, Path("/nowhere"), "", True)
WRITER = AdapterVersion("writer", 1, Path("/nowhere"), "", True)


def test_the_total_is_enforced_and_given_back() -> None:
    admission = Admission(max_total=1, max_per_adapter=1)
    with admission.admit():
        with pytest.raises(ConcurrencyLimitError, match="max_concurrent_requests"):
            admission.admit()
    assert admission.in_flight() == (0, {})


def test_each_adapter_is_limited_on_its_own() -> None:
    admission = Admission(max_total=3, max_per_adapter=1)
    first, second = admission.admit(), admission.admit()
    first.bind(ALPHA)
    second.bind(None)
    with admission.admit() as third, pytest.raises(ConcurrencyLimitError, match="alpha@1"):
        third.bind(ALPHA)
    assert admission.in_flight() == (2, {"alpha@1": 1, BASE_NAME: 1})
    first.release()
    first.release()  # idempotent
    second.release()
    assert admission.in_flight() == (0, {})


def test_a_summary_on_the_requests_own_adapter_takes_no_second_place() -> None:
    admission = Admission(max_total=1, max_per_adapter=1)
    with admission.admit() as ticket:
        ticket.bind(ALPHA)
        with ticket.nested(ALPHA):
            assert admission.in_flight() == (1, {"alpha@1": 1})


def test_a_summary_on_another_adapter_holds_a_place_there_until_it_ends() -> None:
    admission = Admission(max_total=1, max_per_adapter=1)
    with admission.admit() as ticket:
        ticket.bind(ALPHA)
        with ticket.nested(WRITER):
            assert admission.in_flight() == (1, {"alpha@1": 1, "writer@1": 1})
        assert admission.in_flight() == (1, {"alpha@1": 1})


def test_limits_below_one_are_refused() -> None:
    with pytest.raises(ValueError, match="max_total"):
        Admission(max_total=0, max_per_adapter=1)
