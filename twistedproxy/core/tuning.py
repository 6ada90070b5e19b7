"""
Run-time tuning of the core: a pool's live settings changed in place, and
what they are now.  Callers check values first
(L{twistedproxy.config.settings.parse}); this applies them.

A pool's config is what new clients and connections read; the pool makes its
open clients and connections follow (L{HashRoute.use_config}), so nothing
outside the core touches a connection.
"""

from __future__ import annotations

import dataclasses

from twistedproxy.config.settings import POOL_SETTINGS


def tune_pool(pool, changes: dict) -> None:
    """Apply the checked pool settings C{changes} (names in L{POOL_SETTINGS}; C{timeout} 0: none) to C{pool}."""
    replace = {name: changes[name] for name in POOL_SETTINGS if name in changes}
    if "timeout" in replace:
        replace["timeout"] = replace["timeout"] or None
    if replace:
        pool.use_config(dataclasses.replace(pool.config, **replace))


def pool_settings(pool) -> dict:
    """C{pool}'s live settings, as L{tune_pool} takes them."""
    config = pool.config
    return {
        "client_max_pending": config.client_max_pending,
        "max_request_bytes": config.max_request_bytes,
        "timeout": config.timeout or 0,
    }
