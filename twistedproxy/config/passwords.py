"""
Users' passwords in the configuration, and how a login is checked against one.

A password is written as one of:

  - the text itself (the file then holds it in clear);
  - C{sha256:HEX}: its SHA-256, 64 hex digits (fast: a leaked file's
    passwords can be guessed quickly unless they are long and random);
  - C{pbkdf2:sha256:ITERATIONS:SALT:HEX}: PBKDF2-HMAC-SHA256 of the password
    with SALT (its UTF-8 bytes) over ITERATIONS rounds, HEX its 32-byte
    result: a leaked file costs an attacker that many rounds per guess.

Make a pbkdf2 one with C{python -m twistedproxy.config.passwords} (or
C{cacheproxyctl hash-password}): it reads the password from standard input and
prints the line to put in the file.

Checking a pbkdf2 password takes milliseconds of CPU in a single-threaded
worker, so a L{Checker} remembers, per user, the last password that passed
and the last few that failed (as salted SHA-256s with a salt of the process's
own, never the text): reconnecting clients, and clients retrying a wrong
password by themselves, cost one fast hash each.  New guesses cost the full
check; the failed-login limit (L{twistedproxy.core.logins}) bounds how many
an address can make.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import os
import re
import sys
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

DEFAULT_ITERATIONS = 100000
# Wrong passwords remembered per user (the Checker's).
FAILED_KEPT = 8

# At least this many rounds for a pbkdf2 password (fewer would be a sha256 with extra steps).
MIN_ITERATIONS = 1000

_SHA256 = re.compile(r"sha256:[0-9a-fA-F]{64}\Z")
_PBKDF2 = re.compile(r"pbkdf2:sha256:([0-9]{1,10}):([^:]+):([0-9a-fA-F]{64})\Z")


@dataclass(frozen=True)
class Password:
    """
    A user's password as the file gives it: the text, its SHA-256 (hex,
    lowercase), or a PBKDF2 of it (C{pbkdf2}: iterations, salt, hex result).
    """

    text: Optional[str] = field(default=None, repr=False)
    sha256: Optional[str] = None
    pbkdf2: Optional[tuple] = None

    @property
    def slow(self) -> bool:
        """Checking it costs enough CPU to be worth remembering a success (L{Checker})."""
        return self.pbkdf2 is not None


def parse(text: str) -> Password:
    """The L{Password} C{text} writes; ValueError saying why when it is a malformed hash."""
    if text.startswith("sha256:"):
        if not _SHA256.match(text):
            raise ValueError("a sha256: password is 64 hex digits after 'sha256:'")
        return Password(sha256=text[len("sha256:"):].lower())
    if text.startswith("pbkdf2:"):
        match = _PBKDF2.match(text)
        if match is None:
            raise ValueError("a pbkdf2 password is pbkdf2:sha256:ITERATIONS:SALT:HEX (64 hex digits),"
                             " as python -m twistedproxy.config.passwords makes it")
        iterations = int(match.group(1))
        if iterations < MIN_ITERATIONS:
            raise ValueError("a pbkdf2 password needs at least %d iterations (got %d)" % (MIN_ITERATIONS, iterations))
        return Password(pbkdf2=(iterations, match.group(2), match.group(3).lower()))
    return Password(text=text)


def matches(password: Password, given: bytes) -> bool:
    """C{given} is C{password} (compared in constant time)."""
    if password.pbkdf2 is not None:
        iterations, salt, digest = password.pbkdf2
        derived = hashlib.pbkdf2_hmac("sha256", given, salt.encode("utf-8"), iterations).hex()
        return hmac.compare_digest(derived, digest)
    if password.sha256 is not None:
        return hmac.compare_digest(hashlib.sha256(given).hexdigest(), password.sha256)
    return hmac.compare_digest(given, password.text.encode("utf-8"))


class Checker:
    """Checks logins against L{Password}s, remembering each user's last successful and failed slow ones."""

    def __init__(self):
        self._salt = os.urandom(16)
        self._passed = {}  # user -> salted SHA-256 of the password that last passed
        self._failed = {}  # user -> the salted SHA-256s of the last FAILED_KEPT that failed

    def check(self, user: bytes, password: Password, given: bytes) -> bool:
        if not password.slow:
            return matches(password, given)
        fast = hashlib.sha256(self._salt + given).digest()
        known = self._passed.get(user)
        if known is not None and hmac.compare_digest(known, fast):
            return True
        failed = self._failed.get(user)
        if failed is not None and fast in failed:
            return False
        if not matches(password, given):
            if failed is None:
                failed = self._failed[user] = deque(maxlen=FAILED_KEPT)
            failed.append(fast)
            return False
        self._passed[user] = fast
        return True


def make(password: bytes, iterations: int = DEFAULT_ITERATIONS, salt: Optional[str] = None) -> str:
    """The C{pbkdf2:sha256:...} text for C{password}, with a random salt unless given."""
    if salt is None:
        salt = os.urandom(16).hex()
    digest = hashlib.pbkdf2_hmac("sha256", password, salt.encode("utf-8"), iterations).hex()
    return "pbkdf2:sha256:%d:%s:%s" % (iterations, salt, digest)


def main(argv=None, stdin=None, stdout=None, prog="python -m twistedproxy.config.passwords") -> int:
    """C{python -m twistedproxy.config.passwords}: the password on standard input, its line on standard output."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Read a password from standard input (its first line) and print its"
                    " pbkdf2:sha256:ITERATIONS:SALT:HEX form for a user of the configuration.")
    parser.add_argument("--iterations", type=int, default=DEFAULT_ITERATIONS,
                        help="PBKDF2 rounds (default %d, at least %d)" % (DEFAULT_ITERATIONS, MIN_ITERATIONS))
    options = parser.parse_args(argv)
    stdin = stdin if stdin is not None else sys.stdin.buffer
    stdout = stdout if stdout is not None else sys.stdout
    if options.iterations < MIN_ITERATIONS:
        parser.error("--iterations must be at least %d" % (MIN_ITERATIONS,))
    line = stdin.readline()
    password = line[:-1] if line.endswith(b"\n") else line
    if password.endswith(b"\r"):
        password = password[:-1]
    if not password:
        print("no password on standard input", file=sys.stderr)
        return 1
    print(make(password, options.iterations), file=stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
