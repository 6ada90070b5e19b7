"""The README's configuration reference matches the loader's key table."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_config_reference_is_current():
    script = os.path.join(ROOT, "scripts", "config_reference.py")
    result = subprocess.run([sys.executable, script, "--check"])
    assert result.returncode == 0, "README.md is stale: run python scripts/config_reference.py"
