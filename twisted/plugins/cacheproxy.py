"""twistd plugin: C{twistd -n cacheproxy -c conf.yml} (see L{twistedproxy.tap})."""

from twisted.application.service import ServiceMaker

cacheproxy = ServiceMaker(
    "cacheproxy",
    "twistedproxy.tap",
    "A twemproxy-compatible caching proxy for memcached and Redis",
    "cacheproxy",
)
