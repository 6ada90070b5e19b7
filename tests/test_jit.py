"""
Lists of one shape (twistedproxy.core.jit).
"""

from __future__ import annotations

import sys

import pytest

from twistedproxy.core.jit import object_list

PYPY = sys.implementation.name == "pypy"


def test_an_object_list_is_an_empty_list():
    made = object_list()
    assert made == [] and type(made) is list
    assert object_list() is not made


@pytest.mark.skipif(not PYPY, reason="PyPy's list storage strategies")
def test_an_object_list_keeps_its_storage_when_filled_with_bytes_and_emptied():
    from __pypy__ import strategy

    made = object_list()
    assert strategy(made) == "ObjectListStrategy"
    made.append(b"a frame")
    assert strategy(made) == "ObjectListStrategy"  # a new list holding bytes only would store bytes
    del made[:]
    assert strategy(made) == "ObjectListStrategy"
