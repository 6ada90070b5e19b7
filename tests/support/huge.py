"""What the huge-request tests and bench/stall.py share: their keys, values and settings."""

# The README's example settings, with which one huge request used to eject every server.
README_SETTINGS = {"timeout": 400, "auto_eject_hosts": True, "server_failure_limit": 1, "server_retry_timeout": 2000}


def key(i: int) -> bytes:
    return b"k:%07d" % i


def value(i: int) -> bytes:
    return b"v%d" % i
