"""
Failed logins with workers: each worker reports every failed login's client
address to the master (L{channel.AuthFailed}); the master counts them across
workers with the same L{FailureCounter} a single process uses, and tells every
worker which address is blocked and for how long (L{channel.AuthBlocked}).  A
worker that starts (a respawn, a new generation) gets the blocks in force with
its configuration (L{channel.Hello}'s C{blocked}).
"""

from __future__ import annotations

import json

from twistedproxy.core.logins import FailureCounter, log_block
from twistedproxy.process import channel


class MasterLogins:
    """The master's side: every worker's failed logins, counted per client address."""

    def __init__(self, master):
        self.master = master
        glob = master.config.global_
        self.counter = FailureCounter(glob.auth_failures_limit, glob.auth_block_seconds)

    def configure(self, config) -> None:
        """A reload: new limits from now on."""
        self.counter.configure(config.global_.auth_failures_limit, config.global_.auth_block_seconds)

    def failed(self, address: str) -> None:
        """A worker refused a login from C{address}."""
        counter = self.counter
        if not counter.failed(address, self.master.reactor.seconds()):
            return
        log_block(address, counter.block_seconds, counter.limit)
        for worker in self.master.live_workers():
            try:
                worker.channel.callRemote(channel.AuthBlocked, address=address, seconds=counter.block_seconds)
            except Exception:
                pass  # the channel is closing: the worker is on its way out

    def blocks(self) -> str:
        """The blocks in force (address -> seconds left) as JSON, for a worker's Hello."""
        return json.dumps(self.counter.blocks(self.master.reactor.seconds()))


def apply_blocks(limiter, text: str) -> None:
    """A new worker's L{twistedproxy.core.logins.RemoteAuthLimiter} takes the master's blocks (L{MasterLogins.blocks})."""
    for address, seconds in (json.loads(text) if text else {}).items():
        limiter.block(address, seconds)
