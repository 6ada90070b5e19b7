"""
The C{cacheproxy} command: the twistd plugin without twistd's boilerplate.

C{cacheproxy -c conf.yml} behaves like C{twistd -n cacheproxy -c conf.yml}:
foreground, logs to standard error (or C{-o FILE}), stops on SIGINT/SIGTERM.
"""

from __future__ import annotations

import os
import sys

from twisted.python import usage

from twistedproxy import tap


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    options = tap.Options()
    try:
        options.parseOptions(argv)
    except usage.UsageError as e:
        sys.stderr.write("cacheproxy: %s\n%s\n" % (e, options))
        return 2
    if options["test-conf"]:
        return 0 if tap.check_config(options["conf-file"]) else 1

    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner

    from twistedproxy import logs

    try:
        proxy_service = tap.makeService(options, reactor)
    except usage.UsageError as e:
        sys.stderr.write("cacheproxy: %s\n" % (e,))
        return 1
    # With -o, makeService already sent the log to that file.
    observers = [] if options["output"] else [logs.filtered_observer()]
    globalLogBeginner.beginLoggingTo(observers, redirectStandardIO=False)
    if options["pid-file"]:
        with open(options["pid-file"], "w") as f:
            f.write("%d\n" % os.getpid())
    reactor.callWhenRunning(proxy_service.startService)
    reactor.addSystemEventTrigger("before", "shutdown", proxy_service.stopService)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
