"""
The C{cacheproxy} command: the twistd plugin without twistd's boilerplate.

C{cacheproxy -c conf.yml} behaves like C{twistd -n cacheproxy -c conf.yml}:
foreground, logs to standard error (or C{-o FILE}), stops on SIGINT/SIGTERM;
with C{-d} it detaches as nutcracker does (L{command.daemonize}).
"""

from __future__ import annotations

import os
import sys

from twisted.python import usage

from twistedproxy import tap
from twistedproxy.process import command, nursery


def main(argv=None) -> int:
    main_process = argv is None  # the command itself, not a call from a program or a test
    argv = sys.argv[1:] if argv is None else argv
    argv = ["-h" if arg == "-?" else arg for arg in argv]  # nutcracker's other name for -h
    options = tap.Options()
    try:
        options.parseOptions(argv)
    except usage.UsageError as e:
        sys.stderr.write("cacheproxy: %s\n%s\n" % (e, options))
        return 2
    if options["test-conf"]:
        return 0 if tap.check_config(options["conf-file"]) else 1
    if main_process:
        nursery.reexec(command.launch_argv())

    from twisted.logger import Logger, globalLogBeginner

    from twistedproxy import logs
    from twistedproxy.process.upgrade import READY_ENV
    from twistedproxy.reactor import install as install_reactor

    try:
        reactor = install_reactor()
    except ValueError as e:
        sys.stderr.write("cacheproxy: %s\n" % (e,))
        return 1
    try:
        proxy_service = tap.makeService(options, reactor)
    except usage.UsageError as e:
        sys.stderr.write("cacheproxy: %s\n" % (e,))
        return 1
    # The configuration is checked and the log file open: errors so far went to the terminal.
    # The new master of an upgrade is already detached (and its old master waits for it).
    if options["daemonize"] and READY_ENV not in os.environ:
        command.daemonize()
    # With -o, makeService already sent the log to that file.
    observers = [] if options["output"] else [logs.filtered_observer()]
    globalLogBeginner.beginLoggingTo(observers, redirectStandardIO=False)
    failed = []

    def start():
        # One that cannot start (a port in use) ends, as nutcracker does; with -d
        # the waiting command then exits 1 instead of waiting for ever.
        try:
            proxy_service.startService()
        except Exception:
            Logger().failure("cacheproxy cannot start")
            failed.append(True)
            reactor.stop()

    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", proxy_service.stopService)
    reactor.run()
    # A single process listens once warm (ProxyService.serving): it too may fail to.
    return 1 if failed or getattr(proxy_service, "failed", False) else 0


if __name__ == "__main__":
    sys.exit(main())
