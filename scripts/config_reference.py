"""
Writes the README's configuration reference tables from the config loader's
key table (twistedproxy.config.describe_keys), so the two cannot drift apart.

    python scripts/config_reference.py          # rewrite README.md in place
    python scripts/config_reference.py --check  # exit 1 if README.md is stale
"""

from __future__ import annotations

import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from twistedproxy.config import describe_keys  # noqa: E402

README = os.path.join(ROOT, "README.md")
BLOCK = re.compile(r"(<!-- config-keys (\w+) -->\n).*?(<!-- /config-keys -->)", re.S)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def table(section: str) -> str:
    """The markdown table of one section's keys ('pool' or 'global')."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key in describe_keys():
        if key.section == section:
            default = "`%s`" % (key.default,) if key.default is not None else "—"
            lines.append("| `%s` | %s | %s | %s |" % (key.key, _cell(key.type), _cell(default), _cell(key.meaning)))
    return "\n".join(lines) + "\n"


def render(text: str) -> str:
    return BLOCK.sub(lambda m: m.group(1) + table(m.group(2)) + m.group(3), text)


def main(argv) -> int:
    with open(README) as f:
        current = f.read()
    wanted = render(current)
    if "--check" in argv:
        return 0 if wanted == current else 1
    with open(README, "w") as f:
        f.write(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
