"""
Log output with a level that can change at run time (nutcracker's C{-v},
SIGTTIN/SIGTTOU, the control client and the stats endpoint), and the one
parser of a level given as text (L{parse_level}).
"""

from __future__ import annotations

import os
import sys

from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    PredicateResult,
    globalLogPublisher,
    textFileLogObserver,
)

# nutcracker's -v levels are syslog-like, 0 (emerg) .. 11 (pverb), default 5 (notice).
DEFAULT_VERBOSITY = 5

level_filter = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)

# Quietest first: SIGTTIN steps right (more output), SIGTTOU left.
LEVELS = (LogLevel.critical, LogLevel.error, LogLevel.warn, LogLevel.info, LogLevel.debug)
_LEVEL_WORDS = dict({level.name: level for level in LEVELS}, warning=LogLevel.warn)


def level_for_verbosity(verbosity: int) -> LogLevel:
    """Map a nutcracker C{-v} number onto a Twisted log level."""
    if verbosity <= 2:
        return LogLevel.critical
    if verbosity == 3:
        return LogLevel.error
    if verbosity == 4:
        return LogLevel.warn
    if verbosity <= 6:
        return LogLevel.info
    return LogLevel.debug


def parse_level(text) -> LogLevel:
    """
    The one reading of a log level, wherever one is given (C{cacheproxyctl
    log-level} and C{set log_level=}, the stats endpoint's C{/tune}, the
    worker channel): a name (debug, info, warn or warning, error, critical;
    any case) or a nutcracker C{-v} number 0 .. 11.  Raises ValueError.
    """
    word = str(text).strip().lower()
    if word.isdigit() and int(word) <= 11:
        return level_for_verbosity(int(word))
    if word in _LEVEL_WORDS:
        return _LEVEL_WORDS[word]
    raise ValueError("unknown log level %r (debug, info, warn, error, critical or 0..11)" % (str(text),))


def set_level(level: LogLevel) -> None:
    """Change the level of every observer made by L{filtered_observer}."""
    level_filter.setLogLevelForNamespace(None, level)


def current_level() -> LogLevel:
    return level_filter.logLevelForNamespace(None)


def stepped_level(step: int) -> LogLevel:
    """The level C{step} places from the current one (+1 more verbose), within L{LEVELS}."""
    level = current_level()
    index = LEVELS.index(level) if level in LEVELS else LEVELS.index(LogLevel.info)
    return LEVELS[max(0, min(len(LEVELS) - 1, index + step))]


def filtered_observer(output=None):
    """A text observer on C{output} (a file path or file object; stderr by default) obeying the level."""
    if output is None or output == "-":
        stream = sys.stderr
    elif isinstance(output, str):
        stream = _LogFile(output)
    else:
        stream = output
    return FilteringLogObserver(textFileLogObserver(stream), [quiet_refusals, level_filter])


# What Twisted logs when accept() fails for want of a descriptor (twisted.internet.tcp._accept).
REFUSED_FORMAT = "EMFILE recovery: Closed socket from {address}"
_QUIET = frozenset((
    "EMFILE encountered; releasing reserved file descriptor.",
    "Re-reserving EMFILE recovery file descriptor.",
    "Could not re-reserve EMFILE recovery file descriptor.",
    REFUSED_FORMAT,
))
_OUT_OF_FILES = ("EMFILE", "ENFILE")


def is_refusal_event(event) -> bool:
    """Whether C{event} is one of Twisted's lines about a client refused for want of a descriptor."""
    fmt = event.get("log_format")
    return fmt in _QUIET or (fmt == "Could not accept new connection ({acceptError})"
                             and event.get("acceptError") in _OUT_OF_FILES)


def quiet_refusals(event):
    """A log predicate: Twisted's per-client EMFILE lines are not written (L{twistedproxy.process.limits.RefusalLog} sums them up)."""
    return PredicateResult.no if is_refusal_event(event) else PredicateResult.maybe


class _LogFile:
    """A log file that L{reopen} can reopen (after rotation: SIGUSR1)."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)  # reopened after -d has moved us to /
        self.file = open(path, "a", buffering=1)
        _log_files.append(self)

    def write(self, text):
        self.file.write(text)

    def flush(self):
        self.file.flush()

    def reopen(self) -> None:
        old, self.file = self.file, open(self.path, "a", buffering=1)
        old.close()


_log_files = []


def reopen() -> None:
    """Reopen every log file opened here (log rotation)."""
    for log_file in _log_files:
        log_file.reopen()


def add_observer(output=None) -> None:
    """Send log events at or above the current level to C{output}."""
    globalLogPublisher.addObserver(filtered_observer(output))
