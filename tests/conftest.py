"""Shared fixtures: real backend processes on loopback, stopped after each test."""

from __future__ import annotations

import pytest

from tests.support import processes


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
