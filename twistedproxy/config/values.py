"""
The building blocks of the configuration's key tables: how twemproxy reads a
scalar (as text), the value types every section uses (integers, booleans,
choices, text, addresses), and the errors they raise.

A value type has a C{name} (shown in the configuration reference) and a
C{parse(node, report)} that returns the model's value or raises L{Invalid};
the loader adds file, line, section and key to the message.
"""

from __future__ import annotations

import ipaddress
import math
import re
from typing import Any, Callable, Optional, Sequence, Tuple

from twistedproxy.config.tree import MAPPING, SCALAR, SEQUENCE, ConfigNode

INT_MAX = 2 ** 31 - 1  # twemproxy keeps every number in a C int
UNIX_PATH_MAX = 108  # sizeof(sockaddr_un.sun_path) on Linux, the NUL included


class ConfigError(Exception):
    """
    The configuration was refused.  C{errors} holds every problem found, each a
    complete C{file:line: pool 'name': key 'key': message} line, in file order.
    """

    def __init__(self, errors: Sequence[str]) -> None:
        self.errors = list(errors)
        Exception.__init__(self, "\n".join(self.errors))

    def __str__(self) -> str:
        return "\n".join(self.errors)


class Invalid(Exception):
    """One problem with one value; whoever catches it adds file, line, section and key."""

    def __init__(self, message: str, line: Optional[int] = None) -> None:
        Exception.__init__(self, message)
        self.message = message
        self.line = line


# A value type calls this for each problem when it can find more than one
# (one per bad server line), rather than stopping at the first.
Report = Callable[[str, Optional[int]], None]


# --------------------------------------------------------------------------
# Reading scalars the way twemproxy does: as text


DECIMAL = re.compile(r"[+-]?[0-9]+\Z")
DIGITS = re.compile(r"[0-9]+\Z")
HOSTNAME = re.compile(r"[A-Za-z0-9_.-]+\Z")
OCTAL_PERMISSION = re.compile(r"[0-7]{1,4}\Z")
BITMASK = re.compile(r"[01]+\Z")


def quote(text: str) -> str:
    return "'%s'" % (text,)


def is_null(node: ConfigNode) -> bool:
    return node.kind == SCALAR and node.value is None


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def scalar_text(node: ConfigNode) -> Optional[str]:
    """
    A scalar as twemproxy reads it, the text as written; None for collections,
    nulls and non-string data handed to L{config_from_dict}.
    """
    if node.kind != SCALAR or node.value is None:
        return None
    if node.plain_text is not None:
        return node.plain_text
    if isinstance(node.value, str):
        return node.value
    return None


def describe(node: ConfigNode) -> str:
    """A value as an error message quotes it."""
    if node.kind == MAPPING:
        return "a mapping"
    if node.kind == SEQUENCE:
        return "a list"
    if node.value is None:
        return "an empty value"
    text = scalar_text(node)
    if text is None:
        value = node.value
        text = ("true" if value else "false") if isinstance(value, bool) else repr(value)
    return quote(text)


def key_name(node: ConfigNode) -> Optional[str]:
    """A mapping key as text (YAML C{123:} names pool '123'); None when it is not a scalar."""
    if node.kind != SCALAR:
        return None
    if node.plain_text is not None:
        return node.plain_text
    return node.value if isinstance(node.value, str) else None


def integer_value(node: ConfigNode, expected: str) -> int:
    """
    A whole number written in decimal, as twemproxy's C{nc_atoi} reads it
    (so C{0400} is 400, not YAML 1.1's octal 256; C{0x10} is refused).
    """
    text = scalar_text(node)
    if text is not None:
        if DECIMAL.match(text.strip()):
            return int(text.strip(), 10)
    elif node.kind == SCALAR and is_int(node.value):
        return node.value
    raise Invalid("expected %s, got %s" % (expected, describe(node)))


def number_value(node: ConfigNode, expected: str) -> float:
    """A finite number, written as text (C{0.5}, C{1e3}) or given as one by Python data."""
    text = scalar_text(node)
    value: Optional[float] = None
    if text is not None:
        try:
            value = float(text)
        except ValueError:
            pass
    elif node.kind == SCALAR and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        value = float(node.value)
    if value is None or not math.isfinite(value):
        raise Invalid("expected %s, got %s" % (expected, describe(node)))
    return value


def check_socket_path(path: str) -> None:
    if len(path.encode("utf-8")) >= UNIX_PATH_MAX:
        raise Invalid("UNIX socket path %s is too long (at most %d bytes)"
                       % (quote(path), UNIX_PATH_MAX - 1))


def octal_permissions(text: str) -> int:
    """A UNIX socket's permissions written in octal, as twemproxy's C{listen: /path 0666} takes them."""
    if not OCTAL_PERMISSION.match(text) or int(text, 8) > 0o777:
        raise Invalid("invalid socket permissions %s (expected octal like 0666)" % (quote(text),))
    return int(text, 8)


def parse_host(text: str) -> str:
    """A hostname or IP address; an IPv6 address loses its brackets."""
    host = text
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
    if bracketed or ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise Invalid("invalid IPv6 address %s" % (quote(text),))
        return host
    if not HOSTNAME.match(host):
        raise Invalid("invalid host %s" % (quote(text),))
    return host


def parse_port(text: str) -> int:
    if not DIGITS.match(text) or not 1 <= int(text) <= 65535:
        raise Invalid("invalid port %s (expected 1-65535)" % (quote(text),))
    return int(text)


def host_and_port(text: str, expected_format: str) -> Tuple[str, int]:
    """C{host:port}, split at the last colon like twemproxy (so C{::1:6379} works)."""
    host, colon, port = text.rpartition(":")
    if not colon or not host:
        raise Invalid("expected %s, got %s" % (expected_format, quote(text)))
    return parse_host(host), parse_port(port)


def address_key(host: Optional[str], port: Optional[int], path: Optional[str]) -> Tuple:
    """What makes two addresses the same, for duplicate checks (case, IPv6 spellings)."""
    if path is not None:
        return ("unix", path)
    assert host is not None
    if ":" in host:
        host = ipaddress.ip_address(host).compressed
    return ("inet", host.lower(), port)


# --------------------------------------------------------------------------
# Value types: each has the name shown in the reference and a parse() that
# returns the model's value or raises Invalid.


class ValueType:
    name = ""

    def parse(self, node: ConfigNode, report: Report) -> Any:
        raise NotImplementedError


class Integer(ValueType):
    def __init__(self, minimum: int, name: Optional[str] = None) -> None:
        self.minimum = minimum
        self.name = name or "integer >= %d" % (minimum,)

    def parse(self, node: ConfigNode, report: Report) -> Any:
        value = integer_value(node, "an integer >= %d" % (self.minimum,))
        if value < self.minimum:
            if self.minimum == 0:
                raise Invalid("must not be negative (got %d)" % (value,))
            raise Invalid("must be at least %d (got %d)" % (self.minimum, value))
        if value > INT_MAX:
            raise Invalid("is too large (got %d, at most %d)" % (value, INT_MAX))
        return value


class Milliseconds(Integer):
    """A timeout in ms where 0, like twemproxy's unset -1, means none: stored as None."""

    def __init__(self) -> None:
        Integer.__init__(self, 0, "integer >= 0 (ms)")

    def parse(self, node: ConfigNode, report: Report) -> Any:
        return Integer.parse(self, node, report) or None


class Boolean(ValueType):
    """twemproxy takes exactly C{true} or C{false} (YAML's C{True}, C{yes}, C{on} are refused)."""

    name = "true | false"

    def parse(self, node: ConfigNode, report: Report) -> Any:
        if node.kind == SCALAR:
            if node.plain_text is None and isinstance(node.value, bool):
                return node.value
            text = scalar_text(node)
            if text in ("true", "false"):
                return text == "true"
        raise Invalid("expected true or false, got %s" % (describe(node),))


class Choice(ValueType):
    def __init__(self, choices: Sequence[str], noun: str) -> None:
        self.choices = tuple(choices)
        self.noun = noun
        self.name = " | ".join(self.choices)

    def parse(self, node: ConfigNode, report: Report) -> Any:
        text = scalar_text(node)
        if text in self.choices:
            return text
        expected = "expected one of: %s" % (", ".join(self.choices),)
        if text is None:
            raise Invalid("%s, got %s" % (expected, describe(node)))
        raise Invalid("unknown %s %s (%s)" % (self.noun, quote(text), expected))


class Text(ValueType):
    """A string; a number is taken as its digits (YAML C{redis_auth: 1234})."""

    name = "string"

    def parse(self, node: ConfigNode, report: Report) -> Any:
        text = scalar_text(node)
        if text is None and node.kind == SCALAR and is_int(node.value):
            text = str(node.value)
        if text is None:
            raise Invalid("expected a string, got %s" % (describe(node),))
        if not text:
            raise Invalid("must not be empty")
        return text


TEXT = Text()


class SocketPath(Text):
    name = "path"

    def parse(self, node: ConfigNode, report: Report) -> Any:
        path = Text.parse(self, node, report)
        check_socket_path(path)
        return path
