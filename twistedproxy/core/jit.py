"""
Shapes for PyPy's JIT.

Code the JIT compiled checks the shape of what it meets (an object's class, a
list's storage); a shape it meets rarely is compiled in a pause of milliseconds
while the process serves (bench/README.md, "Measured in the eleventh #10
session").  L{object_list} makes lists that keep one shape for their whole life.
"""

from __future__ import annotations

def object_list() -> list:
    """
    An empty list that stores objects, as a list that held some does.  On PyPy
    a new list's storage changes with its first item (and stays a special one
    for bytes or ints), and a list emptied with C{del l[:]} keeps its storage
    (C{[]} and C{clear()} do not): a list made here and emptied that way keeps
    one shape, so the code that checks whether it is empty compiles one path.
    """
    made = [None]
    del made[:]
    return made
