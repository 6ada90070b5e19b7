"""
The long reactor iterations in a PyPy log that C{bench/pauses.py} marked
(C{PAUSES_SECTIONS=1}), with what the JIT and the garbage collector did inside
each: the sections opened directly in the iteration, summed per kind, in ms.

    python3 bench/iterlog.py PYPYLOG_FILE [--ms 1.0] [--since MONOTONIC] [--until MONOTONIC]

One line per iteration of at least C{--ms}: its start (C{time.monotonic()},
the clock of C{pauses.txt} and of C{bench/jithook}'s log), its length, the
poll's events, then e.g. C{jit-tracing=8.18 gc-minor=0.40}; an iteration with
no section took its time in interpreted or compiled code.  A trace that starts
in one iteration and ends in a later one (a bridge traced through the poll)
shows in the later one's end only by its length: the other sections are
counted where they open.
"""

from __future__ import annotations

import argparse
import collections
import re

SECTION = re.compile(r"^\[([0-9a-f]+)\] (\{)?([A-Za-z0-9-]+)(\})?$")


def iterations(lines):
    """(start tick, end tick, events, monotonic, {section: ticks}) per marked iteration."""
    stack = []
    current = None
    for line in lines:
        match = SECTION.match(line)
        if match is None:
            if current is not None and current[3] is None and stack and stack[-1][0] == "tp-iter":
                fields = line.split()
                if len(fields) == 2 and fields[0].isdigit():
                    current[2], current[3] = int(fields[0]), float(fields[1])
            continue
        tick, opening, name = int(match.group(1), 16), match.group(2), match.group(3)
        if opening:
            if name == "tp-iter":
                current = [tick, None, None, None, collections.Counter()]
            stack.append((name, tick))
            continue
        if name not in [entry[0] for entry in stack]:
            continue
        while stack[-1][0] != name:
            stack.pop()
        _, opened = stack.pop()
        if name == "tp-iter":
            if current is not None:
                current[1] = tick
                yield current
            current = None
        elif current is not None and stack and stack[-1][0] == "tp-iter":
            current[4][name] += tick - opened


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("log")
    parser.add_argument("--ms", type=float, default=1.0, help="the shortest iteration listed (default 1.0)")
    parser.add_argument("--since", type=float, default=0.0)
    parser.add_argument("--until", type=float, default=float("inf"))
    args = parser.parse_args()
    with open(args.log, errors="replace") as f:
        found = [it for it in iterations(f.read().split("\n")) if it[3] is not None]
    if len(found) < 2:
        raise SystemExit("no iterations marked in %s (PAUSES_SECTIONS=1, tp-iter in PYPYLOG?)" % args.log)
    # The log's clock is the CPU's time-stamp counter: its rate, from the first and last marks.
    rate = (found[-1][0] - found[0][0]) / (found[-1][3] - found[0][3])
    for start, end, events, at, sections in found:
        length = (end - start) / rate * 1000.0
        if length >= args.ms and args.since <= at <= args.until:
            inside = " ".join("%s=%.2f" % (name, ticks / rate * 1000.0) for name, ticks in sections.most_common())
            print("%.6f %7.2fms events=%d %s" % (at, length, events, inside))


if __name__ == "__main__":
    main()
