"""Forked workers (chattune.data.workers): results in order, what they need passed at fork, failures surface."""

import os
import signal

import pytest

from chattune.data.workers import ordered_map


def scaled(item, shared):
    return item * shared["factor"], os.getpid()


def test_results_come_back_in_order_from_forked_workers():
    results = list(ordered_map(scaled, {"factor": 3}, range(40), processes=2, in_flight=3))
    assert [value for value, _ in results] == [3 * i for i in range(40)]
    assert {pid for _, pid in results} - {os.getpid()}  # really computed elsewhere
    assert list(ordered_map(scaled, {"factor": 2}, [5], processes=1)) == [(10, os.getpid())]


def failing(item, shared):
    if item == 3:
        raise ValueError(f"record {item} is bad")
    return item


def test_an_exception_in_a_worker_is_raised_in_the_parent():
    with pytest.raises(ValueError, match="record 3 is bad"):
        list(ordered_map(failing, None, range(8), processes=2))


def killed(item, shared):
    if item == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # a real kill -9 of the worker, as the out-of-memory killer does
    return item


def test_a_worker_killed_mid_map_ends_it_with_an_error_not_a_hang():
    with pytest.raises(RuntimeError, match="a data worker process died"):
        list(ordered_map(killed, None, range(8), processes=2))
