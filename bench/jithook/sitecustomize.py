"""
A JIT compile log for bench/warmup.py --jit: on PyPy, when TP_JIT_LOG names a
file, every loop and bridge the JIT compiles is appended to it as one line:

    MONOTONIC_SECONDS TYPE LOOP_NO BRIDGE_NO OPS WHERE CHAIN [| GUARD]

TYPE is loop, entry_bridge or bridge; WHERE the function, file and line (of the
bytecode) where the trace starts (for a bridge: where the failing guard
resumes); CHAIN the functions the trace runs through, in order; GUARD, for a
bridge, the guard that failed (where it is, the guard, and the operation that
computed what it checks), as the compile hook saw it in its trace.
Loaded as sitecustomize (bench/warmup.py puts this folder first on PYTHONPATH).
"""

import os

PATH = os.environ.get("TP_JIT_LOG")

if PATH:
    try:
        import pypyjit
    except ImportError:
        pypyjit = None
    if pypyjit is not None:
        import dis
        import re
        import time

        _out = open(PATH, "a", buffering=1)
        _guards = {}  # guard descr address -> what the bridge line says about it
        _descr = re.compile(r"descr=<Guard(0x[0-9a-f]+)>")

        def _line(code, offset):
            line = code.co_firstlineno
            for start, number in dis.findlinestarts(code):
                if start > offset:
                    break
                line = number
            return line

        def _where(op):
            code = op.pycode
            return "%s@%s:%d" % (code.co_name, os.path.basename(code.co_filename), _line(code, op.bytecode_no))

        def _hook(info):
            now = time.monotonic()
            chain = []
            first = None
            where = "?"
            previous = ""
            for op in info.operations:
                if isinstance(op, pypyjit.DebugMergePoint):
                    where = None
                    name = op.pycode.co_name
                    if first is None:
                        first = op
                    if not chain or chain[-1] != name:
                        chain.append(name)
                    last_point = op
                    continue
                if isinstance(op, pypyjit.GuardOp):
                    text = repr(op)
                    found = _descr.search(text)
                    if found:
                        if where is None:
                            where = _where(last_point)
                        _guards[found.group(1)] = "%s %s <- %s" % (where, text.split(" [", 1)[0], previous[:160])
                previous = repr(op)
            line = "%.6f %s %s %s %d %s %s" % (
                now, info.type.replace(" ", "_"), info.loop_no,
                info.bridge_no if info.type == "bridge" else "-",
                len(info.operations), _where(first) if first is not None else "?", ">".join(chain[:16]))
            if info.type == "bridge":
                line += " | " + _guards.get(hex(info.bridge_no), "?")
            _out.write(line + "\n")

        pypyjit.set_compile_hook(_hook)
