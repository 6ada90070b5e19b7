"""Shared fixtures: real backend processes on loopback, stopped after each test."""

from __future__ import annotations

import os

import pytest

from tests.support import processes

# Every proxy the suite starts inherits these; none is timed, and hundreds start.
# A short warm-up (tests/test_warmup.py sets its own where it matters), and PyPy's
# nursery size and marking step given up front, so the command does not run itself
# again to set them (tests/test_nursery.py removes them where that is what it checks).
os.environ.setdefault("TWISTEDPROXY_WARMUP_AUTO", "0.2")
os.environ.setdefault("PYPY_GC_NURSERY", "8MB")
os.environ.setdefault("PYPY_GC_INCREMENT_STEP", "1MB")


@pytest.fixture
def spawn():
    """Start processes with C{spawn(factory, *args)}; all are stopped after the test."""
    started = []

    def start(factory, *args, **kwargs):
        proc = factory(*args, **kwargs)
        started.append(proc)
        return proc

    yield start
    for proc in reversed(started):
        proc.stop()


@pytest.fixture
def redis_backends(spawn):
    """A function returning N fresh redis-server processes."""

    def make(count):
        return [spawn(processes.redis_server) for _ in range(count)]

    return make


@pytest.fixture
def memcached_backends(spawn):
    def make(count):
        return [spawn(processes.memcached) for _ in range(count)]

    return make
