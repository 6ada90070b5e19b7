"""
C{cacheproxyctl migration ...} as users run it, for the migration acceptance
tests and bench/migrate.py, and the records of a proxy's migrations read
over its control socket while waiting for one to reach a state.
"""

from __future__ import annotations

import json
import time

from tests.support.ctl import cacheproxyctl
from twistedproxy.control.client import BlockingControlClient, ControlError


def migration_ctl(control: str, action: str = "status", pool=None) -> dict:
    """C{cacheproxyctl migration ACTION [POOL]}'s JSON; AssertionError with its stderr when it exits non-zero."""
    args = ["migration", action] + ([pool] if pool else [])
    code, out, err = cacheproxyctl(control, *args)
    if code != 0:
        raise AssertionError("cacheproxyctl %s exited %d: %s%s" % (" ".join(args), code, err, out))
    return json.loads(out)


def migration_record(control: str, pool: str):
    """
    The migration record of C{pool} (None when it has none yet), asked over the
    control socket from this process: polling with a new cacheproxyctl process
    each time would take seconds per answer on a loaded machine (PyPy's start).
    """
    try:
        with BlockingControlClient(control) as client:
            return client.migration("status", pool).get(pool)
    except ControlError:
        return None


def wait_migration(control: str, pool: str, states=("done",), timeout: float = 120.0, progress=None) -> dict:
    """
    The record of C{pool} once its state is in C{states}; AssertionError if
    its state is "paused" with an error (unless asked for) or after C{timeout}.
    C{progress}: wait instead until C{progress(record)} is true.
    """
    deadline = time.time() + timeout
    record = None
    while time.time() < deadline:
        record = migration_record(control, pool)
        if record is not None:
            if progress is not None:
                if progress(record):
                    return record
            elif record["state"] in states:
                return record
            if record.get("error") and "paused" not in states:
                raise AssertionError("migration of %s paused with an error: %r" % (pool, record))
        time.sleep(0.1)
    raise AssertionError("migration of %s not %s after %ss: %r" % (pool, progress or "/".join(states), timeout,
                                                                   record))
