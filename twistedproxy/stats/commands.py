"""
The AMP commands of statistics beyond the channel's C{Stats}: the slow log and
run-time settings.  The master sends them to each worker, and C{cacheproxyctl}
sends them to the master (which answers for every worker).  Values travel as
JSON text, like C{Stats}.
"""

from __future__ import annotations

from twisted.protocols import amp

from twistedproxy.net.channels import BigUnicode
from twistedproxy.config.settings import TuningError


class SlowLog(amp.Command):
    """The slow log (most recent first; C{limit} 0: all kept): a JSON list of entries."""

    arguments = [(b"limit", amp.Integer(optional=True))]
    response = [(b"entries", BigUnicode())]


class Tune(amp.Command):
    """
    Change run-time settings (a JSON object, see L{twistedproxy.config.settings});
    C{pool} limits pool settings to one pool.  The answer is a JSON object
    C{{"workers": [settings of each process]}}.
    """

    arguments = [(b"changes", BigUnicode()), (b"pool", amp.Unicode(optional=True))]
    response = [(b"settings", BigUnicode())]
    errors = {TuningError: b"BAD_SETTING"}
