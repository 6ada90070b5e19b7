"""
The handlers PyPy compiles apart (twistedproxy.core.jit): marked at import, on
PyPy only; and lists of one shape.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from twistedproxy.core.jit import compiled_apart, mark_again, object_list

PYPY = sys.implementation.name == "pypy"

# The per-event handlers: each reactor event or turn end runs one of them.
HANDLERS = (
    "twistedproxy.core.client:ClientConnection.dataReceived",
    "twistedproxy.core.client:ClientConnection.flush",
    "twistedproxy.core.server:ServerConnection.dataReceived",
    "twistedproxy.core.server:ServerConnection.flush",
    "twistedproxy.core.batching:TurnFlusher.run",
)


def test_compiled_apart_returns_the_function_itself():
    def handler(x):
        return x + 1

    assert compiled_apart(handler) is handler
    assert handler(1) == 2


@pytest.mark.skipif(not PYPY, reason="PyPy's JIT")
def test_a_function_compiled_apart_has_its_entry_marked():
    import pypyjit

    def marked():
        return 1

    def unmarked():
        return 2

    compiled_apart(marked)
    assert pypyjit.get_jitcell_at_key(0, False, marked.__code__)
    assert not pypyjit.get_jitcell_at_key(0, False, unmarked.__code__)
    mark_again()  # what the warm-up does as its phases start (PyPy may have dropped a mark)
    assert pypyjit.get_jitcell_at_key(0, False, marked.__code__)
    assert not pypyjit.get_jitcell_at_key(0, False, unmarked.__code__)


@pytest.mark.skipif(not PYPY, reason="PyPy's JIT")
def test_the_per_event_handlers_are_compiled_apart_from_import():
    # A fresh interpreter: nothing has run the handlers, so an entry is marked only by the decorator.
    script = textwrap.dedent(
        """
        import importlib, pypyjit
        for name in %r:
            module, path = name.split(":")
            target = importlib.import_module(module)
            for part in path.split("."):
                target = getattr(target, part)
            assert pypyjit.get_jitcell_at_key(0, False, target.__code__), name
        print("marked")
        """
        % (HANDLERS,)
    )
    out = subprocess.run([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         universal_newlines=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("marked"), out.stdout


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
