"""
Moves of keys between two servers of a pool (online migration): what a move
of some keys came to (L{MoveResult}), and the driver that runs a protocol's
move (L{twistedproxy.protocols.interface.IKeyMigration.move}, a generator of
internal requests) over the pool's server connections.
"""

from __future__ import annotations

from typing import NamedTuple, Optional


class MoveResult(NamedTuple):
    """
    What a move of some keys did: C{moved} keys now on the target, C{missing}
    ones found on neither side or already on the target (nothing to move),
    C{failed} ones left where they were (C{error} says why), C{bytes} of
    values moved.
    """

    moved: int = 0
    missing: int = 0
    failed: int = 0
    bytes: int = 0
    error: Optional[str] = None
