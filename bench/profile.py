"""
Where the proxy's time goes: runs twistedproxy under cProfile in front of two
backends, sends bench/run.py's load (pipelined and unpipelined), stops the
proxy and prints the functions with the most own time.

    python3 bench/profile.py --protocol redis            # CPython venv
    python3 bench/profile.py --protocol memcache --python /tmp/vpy/bin/python

cProfile slows the proxy down several times and, on PyPy, hides what the JIT
does; read the output as "where", not "how fast".
"""

from __future__ import annotations

import argparse
import os
import pstats
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run  # noqa: E402  (bench/run.py: processes, loads, interpreters)

processes = run.processes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="twistedproxy under cProfile, with bench/run.py's load")
    parser.add_argument("--protocol", choices=("redis", "memcache"), default="redis")
    parser.add_argument("--python", help="interpreter (default: the CPython venv bench/run.py finds)")
    parser.add_argument("-n", "--requests", type=int, default=100000)
    parser.add_argument("--pipeline", type=int, choices=(1, run.PIPELINE), help="only this pipelining")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--sort", default="tottime", help="pstats sort key (tottime, cumulative...)")
    args = parser.parse_args(argv)
    python = args.python or run.find_python("cpython", None, "/tmp/vcp")
    loader = shutil.which("pypy3") or sys.executable
    load = run.Load(args.protocol, args.requests, True, loader, "mcload")
    running = run.Running()
    out = tempfile.mktemp(prefix="tp-profile-", suffix=".prof")
    try:
        servers = run.backends(running, args.protocol)
        port = processes.free_port()
        pool = processes.pool_config([s.port for s in servers], port, redis=(args.protocol == "redis"))
        conf = processes.write_config({"bench": pool})
        env = dict(os.environ, PYTHONPATH=run.ROOT)
        argv = [python, "-m", "cProfile", "-o", out, "-m", "twistedproxy.cli", "-c", conf,
                "-s", str(processes.free_port()), "-a", processes.HOST]
        proxy = running.add(processes.Process(argv, port, env=env, cwd=run.ROOT))
        for pipeline in [args.pipeline] if args.pipeline else [run.PIPELINE, 1]:
            for test, result in load.run(port, pipeline, args.requests).items():
                print("P=%d %s: %.0f req/s under cProfile" % (pipeline, test, result["rps"]))
        running.stop(proxy, keep_log=True)  # SIGTERM: the reactor stops and cProfile writes its file
        if not os.path.exists(out):
            print(proxy.output()[-3000:], file=sys.stderr)
            return 1
        pstats.Stats(out).strip_dirs().sort_stats(args.sort).print_stats(args.top)
    finally:
        running.stop_all()
        run._unlink(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
