"""
C{cacheproxyctl}: talk to a running master through its control socket.

    cacheproxyctl -s /tmp/twistedproxy.ctl status
    cacheproxyctl -s PATH reload | upgrade | stats | stop [--fast]
    cacheproxyctl -s PATH workers N
    cacheproxyctl -s PATH log-level debug|info|warn|error|critical|0..11
    cacheproxyctl -s PATH slowlog [--limit N]
    cacheproxyctl -s PATH set NAME=VALUE ... [--pool NAME]   (run-time settings)
    cacheproxyctl hash-password [--iterations N] < password   (no socket: prints a
        pbkdf2:sha256:... password for a user of the configuration)

The socket defaults to C{global.control} of the file given with C{-c}, read
even when the file is invalid (so C{status} can show why a reload was refused).

Exit codes: L{EXIT_OK} done, L{EXIT_REFUSED} refused or failed on any worker,
L{EXIT_UNREACHABLE} no master to talk to, L{EX_USAGE} a bad command line.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys

from twistedproxy.control.client import BlockingControlClient, ControlError
from twistedproxy.stats import commands as stats_commands, snapshots
from twistedproxy.config.settings import SETTINGS

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_UNREACHABLE = 2
EX_USAGE = 64  # sysexits.h: the command was used incorrectly

# name -> (one-line help, the sentence of its own -h)
_COMMANDS = {
    "status": ("master and workers: pids, uptime, restarts, config digest, last reload",
               "Print the master's state as JSON: its pid and uptime, every worker (pid, state, uptime,"
               " restarts, last exit), the configuration file and digest, the last reload's outcome, and"
               " under clusters each Redis Cluster pool's nodes with their role and slot ranges."),
    "stats": ("every worker's counters (JSON)",
              "Print every live worker's counters and histograms as JSON, keyed by worker pid."),
    "reload": ("re-read the configuration file (like SIGHUP)",
               "Re-read the configuration file, like SIGHUP: an invalid file changes nothing and exits 1"
               " with the reasons; a worker that does not apply it also makes the command exit 1."),
    "upgrade": ("start a new master on the same sockets (like SIGUSR2)",
                "Start a new master from the installed code on the same sockets, like SIGUSR2; the old one"
                " drains and exits once the new one serves."),
    "stop": ("stop gracefully (like SIGQUIT); --fast is like SIGTERM",
             "Stop the master and its workers: gracefully by default (like SIGQUIT, in-flight requests"
             " finish), at once with --fast (like SIGTERM)."),
    "workers": ("set the number of workers",
                "Run COUNT workers from now on (until the next reload changes worker_processes)."),
    "log-level": ("set the log level of the master and workers",
                  "Set the log level of the master and every worker: a name (debug, info, warn, error,"
                  " critical) or nutcracker's -v number 0..11."),
    "slowlog": ("the slow requests of every worker, most recent first (JSON)",
                "Print the slow requests kept by every worker, merged, most recent first, as JSON."),
    "set": ("change run-time settings in every worker: " + ", ".join(SETTINGS),
            "Change run-time settings in every worker (" + ", ".join(SETTINGS) + "); a refused value"
            " changes nothing, and a worker that fails makes the command exit 1."),
}


class _Parser(argparse.ArgumentParser):
    """Usage errors exit with EX_USAGE (64), not argparse's 2 (which means "unreachable" here)."""

    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(EX_USAGE, "%s: error: %s\n" % (self.prog, message))


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="cacheproxyctl", description="Control a running cacheproxy master through its control socket.",
        epilog="exit codes: 0 done, 1 refused or failed on any worker, 2 master unreachable, 64 usage error")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("-s", "--socket", help="the master's control socket (global.control)")
    where.add_argument("-c", "--conf-file",
                       help="read the control socket path from this configuration (even an invalid one)")
    parser.add_argument("-t", "--timeout", type=float, default=30.0, help="seconds to wait for an answer")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands = {}
    for name, (summary, sentence) in _COMMANDS.items():
        commands[name] = sub.add_parser(name, help=summary, description=sentence)
    commands["stop"].add_argument("--fast", action="store_true", help="do not wait for in-flight requests")
    commands["workers"].add_argument("count", type=int, help="the number of workers (1 or more)")
    commands["log-level"].add_argument("level", help="debug, info, warn, error, critical or 0..11")
    commands["slowlog"].add_argument("--limit", type=int, default=0, help="at most this many (0: all kept)")
    commands["set"].add_argument("settings", nargs="+", metavar="NAME=VALUE", help="a setting and its new value")
    commands["set"].add_argument("--pool", help="limit pool settings to this pool")
    return parser


class _NoMaster(Exception):
    """No control socket to talk to (exit 2)."""


def _control_in_text(text: str):
    """
    The C{global.control} path of a configuration's text, read tolerantly (the
    file may be invalid as a configuration, or even as YAML); None if absent.
    """
    import yaml

    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError:
        tree = None
    if isinstance(tree, dict):
        section = tree.get("global")
        control = section.get("control") if isinstance(section, dict) else None
        return control if isinstance(control, str) and control else None
    # Broken YAML: the first "control:" line indented under a top-level "global:".
    in_global = False
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if not line[0].isspace():
            in_global = line.split("#", 1)[0].strip() == "global:"
            continue
        key, colon, value = line.strip().partition(":")
        if in_global and colon and key == "control":
            value = value.split(" #", 1)[0].strip().strip("\"'")
            return value or None
    return None


def _socket_path(args) -> str:
    if args.socket:
        return args.socket
    from twistedproxy.config import ConfigError, load_config

    try:
        path = load_config(args.conf_file).global_.control
    except OSError as e:
        raise _NoMaster("cannot read %s: %s" % (args.conf_file, e))
    except ConfigError:
        with open(args.conf_file, encoding="utf-8", errors="replace") as f:
            path = _control_in_text(f.read())
        if path:
            sys.stderr.write("cacheproxyctl: note: %s is not a valid configuration (`cacheproxyctl status`"
                             " shows a refused reload's reasons); using its control socket %s\n"
                             % (args.conf_file, path))
    if not path:
        raise _NoMaster("%s has no global: control: socket path (use -s PATH)" % (args.conf_file,))
    return path


def _failed_workers(report: dict) -> list:
    """The error texts of the workers that failed in a C{set} report."""
    return ["worker %s: %s" % (w.get("pid"), w["error"]) for w in report.get("workers", ()) if "error" in w]


def _cluster_nodes(stats: dict) -> dict:
    """Per Redis Cluster pool, its nodes' roles and slot ranges (the last slot map of each worker's pool)."""
    merged = snapshots.merge(stats.values())
    return {
        name: {label: {"role": server["role"], "slots": server.get("slots", "")}
               for label, server in pool["servers"].items() if "role" in server}
        for name, pool in merged["pools"].items()
        if any("role" in server for server in pool["servers"].values())
    }


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["hash-password"]:  # talks to no master: twistedproxy.config.passwords' own command line
        from twistedproxy.config import passwords

        return passwords.main(argv[1:], prog="cacheproxyctl hash-password")
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "set":
        for setting in args.settings:
            if "=" not in setting:
                parser.error("set: expected NAME=VALUE, got %r" % (setting,))
    code = EXIT_OK
    try:
        with BlockingControlClient(_socket_path(args), timeout=args.timeout) as client:
            if args.command == "status":
                result = client.status()
                clusters = _cluster_nodes(client.stats())
                if clusters:
                    result["clusters"] = clusters
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
                for failure in _failed_workers(result):
                    sys.stderr.write("cacheproxyctl: %s\n" % (failure,))
                    code = EXIT_REFUSED
            else:
                result = "log level: %s" % client.set_log_level(args.level)
    except ControlError as e:
        sys.stderr.write("cacheproxyctl: %s\n" % (e,))
        return EXIT_REFUSED
    except _NoMaster as e:
        sys.stderr.write("cacheproxyctl: %s\n" % (e,))
        return EXIT_UNREACHABLE
    except (OSError, socket.timeout) as e:
        sys.stderr.write("cacheproxyctl: cannot reach the master: %s\n" % (e,))
        return EXIT_UNREACHABLE
    if isinstance(result, str):
        print(result)
    else:
        print(json.dumps(result, indent=2, sort_keys=True))
    return code


if __name__ == "__main__":
    sys.exit(main())
