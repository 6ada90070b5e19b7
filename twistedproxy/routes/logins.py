"""
What a route whose clients log in does with them: a pool with C{users:}
(memcached) or a front whose tenants are chosen by user (Redis AUTH, memcached
logins).  The users are a L{twistedproxy.routes.tenants.UserDirectory}; the
request parser keeps each connection's login and checks it against them.
"""

from __future__ import annotations


class LoginRoute:
    """
    A served route's clients and their logins (mixed into
    L{twistedproxy.routes.hash.HashRoute} and L{twistedproxy.routes.tenants.FrontRoute}).

    @ivar users: the users its clients must log in as, or None.
    """

    users = None

    def request_parser(self, codec):
        """A parser for a new client (given the users when it must log in)."""
        parser = codec.request_parser(self.config)
        if self.users is not None:
            parser.use_users(self.users)
        return parser

    def adopt(self, client) -> None:
        """C{client} moves here from the route this one replaces (a reload): its login follows the new users."""
        self.clients.add(client)
        parser = client.parser
        if not hasattr(parser, "use_users"):
            return
        if self.users is not None:
            self.users.adopt(parser)
            parser.use_users(self.users, locked=parser.user is None)
        elif getattr(parser, "users", None) is not None:
            parser.use_users(None, locked=False)  # its clients need no login any more
