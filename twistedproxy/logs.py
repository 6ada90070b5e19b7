"""
Log output with a level that can change at run time (nutcracker's C{-v}, and
later SIGTTIN/SIGTTOU and the control client).
"""

from __future__ import annotations

import os
import sys

from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogPublisher,
    textFileLogObserver,
)

# nutcracker's -v levels are syslog-like, 0 (emerg) .. 11 (pverb), default 5 (notice).
DEFAULT_VERBOSITY = 5

level_filter = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)


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


def set_level(level: LogLevel) -> None:
    """Change the level of every observer made by L{filtered_observer}."""
    level_filter.setLogLevelForNamespace(None, level)


def current_level() -> LogLevel:
    return level_filter.logLevelForNamespace(None)


# Quietest first: SIGTTIN steps right (more output), SIGTTOU left.
LEVELS = (LogLevel.critical, LogLevel.error, LogLevel.warn, LogLevel.info, LogLevel.debug)


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
    from twistedproxy.process.limits import quiet_refusals

    return FilteringLogObserver(textFileLogObserver(stream), [quiet_refusals, level_filter])


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
