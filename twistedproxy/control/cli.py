"""
C{cacheproxyctl}: talk to a running master through its control socket.

    cacheproxyctl -s /tmp/twistedproxy.ctl status
    cacheproxyctl -s PATH reload | upgrade | stats | stop [--fast]
    cacheproxyctl -s PATH workers N
    cacheproxyctl -s PATH log-level debug|info|warn|error|critical|0..11
    cacheproxyctl -s PATH slowlog [--limit N]
    cacheproxyctl -s PATH set NAME=VALUE ... [--pool NAME]   (run-time settings)

The socket defaults to C{global.control} of the file given with C{-c}.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys

from twistedproxy.control.client import BlockingControlClient, ControlError
from twistedproxy.stats import commands as stats_commands
from twistedproxy.stats.tuning import SETTINGS


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cacheproxyctl", description="Control a running cacheproxy master.")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("-s", "--socket", help="the master's control socket (global.control)")
    where.add_argument("-c", "--conf-file", help="read the control socket path from this configuration")
    parser.add_argument("-t", "--timeout", type=float, default=30.0, help="seconds to wait for an answer")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("status", help="master and workers: pids, uptime, config digest, last reload")
    sub.add_parser("stats", help="every worker's counters (JSON)")
    sub.add_parser("reload", help="re-read the configuration file (like SIGHUP)")
    sub.add_parser("upgrade", help="start a new master on the same sockets (like SIGUSR2)")
    stop = sub.add_parser("stop", help="stop gracefully (like SIGQUIT); --fast is like SIGTERM")
    stop.add_argument("--fast", action="store_true")
    workers = sub.add_parser("workers", help="set the number of workers")
    workers.add_argument("count", type=int)
    level = sub.add_parser("log-level", help="set the log level of the master and workers")
    level.add_argument("level")
    slowlog = sub.add_parser("slowlog", help="the slow requests of every worker, most recent first (JSON)")
    slowlog.add_argument("--limit", type=int, default=0, help="at most this many (0: all kept)")
    tune = sub.add_parser("set", help="change run-time settings in every worker: " + ", ".join(SETTINGS))
    tune.add_argument("settings", nargs="+", metavar="NAME=VALUE")
    tune.add_argument("--pool", help="limit pool settings to this pool")
    return parser


def _socket_path(args) -> str:
    if args.socket:
        return args.socket
    from twistedproxy.config import load_config

    path = load_config(args.conf_file).global_.control
    if not path:
        raise ControlError("%s has no global.control socket" % (args.conf_file,))
    return path


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        with BlockingControlClient(_socket_path(args), timeout=args.timeout) as client:
            if args.command == "status":
                result = client.status()
            elif args.command == "stats":
                result = client.stats()
            elif args.command == "reload":
                client.reload()
                result = "reloaded"
            elif args.command == "upgrade":
                client.upgrade()
                result = "upgrade started"
            elif args.command == "stop":
                client.stop(graceful=not args.fast)
                result = "stopping"
            elif args.command == "workers":
                client.set_workers(args.count)
                result = "workers: %d" % args.count
            elif args.command == "slowlog":
                result = json.loads(client.call(stats_commands.SlowLog, limit=args.limit)["entries"])
            elif args.command == "set":
                changes = dict(setting.partition("=")[::2] for setting in args.settings)
                kwargs = {"pool": args.pool} if args.pool else {}
                result = json.loads(client.call(stats_commands.Tune, changes=json.dumps(changes), **kwargs)["settings"])
            else:
                result = "log level: %s" % client.set_log_level(args.level)
    except ControlError as e:
        sys.stderr.write("cacheproxyctl: %s\n" % (e,))
        return 1
    except (OSError, socket.timeout) as e:
        sys.stderr.write("cacheproxyctl: cannot reach the master: %s\n" % (e,))
        return 2
    except Exception as e:  # a ConfigError from -c
        sys.stderr.write("cacheproxyctl: %s\n" % (e,))
        return 2
    if isinstance(result, str):
        print(result)
    else:
        print(json.dumps(result, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
