"""
Routes: what a client's request goes through on its way to the servers (see
L{twistedproxy.routes.interface} for the interface and how to add a route kind).
"""
