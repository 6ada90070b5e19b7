"""
The doors stay one-way: the import-linter contracts of setup.cfg
(C{[importlinter]}: the layers, the core knowing no protocol, no cycles) hold
for the source tree.  A broken one fails here, so C{scripts/test.sh} fails.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_import_contracts_hold():
    pytest.importorskip(
        "importlinter", reason="import-linter's grimp has no PyPy wheel: the CPython run checks the contracts")
    lint = os.path.join(os.path.dirname(sys.executable), "lint-imports")
    # From the checkout: the contracts are checked on the source tree being edited.
    env = dict(os.environ, PYTHONPATH=ROOT)
    result = subprocess.run([lint, "--no-cache", os.path.join(ROOT, "setup.cfg")], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True, timeout=120)
    assert result.returncode == 0, result.stdout
    assert "0 broken" in result.stdout
