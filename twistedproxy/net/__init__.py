"""
Plumbing below every room: listening sockets (L{sockets}) and the AMP pieces
every channel uses (L{channels}).  It imports nothing of the proxy but the logs.
"""
