"""
The codec of a memcache pool: memcached's text and binary protocols on one port.

memcached picks a protocol per connection from the first byte a client sends
(0x80 is the binary request magic; text commands are ASCII), and so does
L{SniffingRequestParser}.  It exposes the chosen codec as C{parser.codec}, which
the core reads after each feed: backend connections are kept per codec, since a
memcached connection speaks one protocol too.  From then on every method of the
chosen codec (reply framing, split/merge, filter and error replies) applies.
"""

from __future__ import annotations

from zope.interface import implementer

from twistedproxy.core.request import REPLY_FINAL
from twistedproxy.protocols import memcache_binary, memcache_login, memcache_text
from twistedproxy.protocols.interface import ICodec, IRequestParser

text_codec = memcache_text.codec
binary_codec = memcache_binary.codec

# The parsers of clients that must log in (memcache_login), per codec.
_LOGIN_PARSERS = {text_codec: memcache_login.TextLoginParser, binary_codec: memcache_login.BinaryLoginParser}
_LOGIN_PARSER_TYPES = tuple(_LOGIN_PARSERS.values())


@implementer(IRequestParser)
class SniffingRequestParser(memcache_login.Login):
    """
    A client parser that becomes the text or the binary parser on the first byte.

    Until that byte arrives C{codec} is the text codec, memcached's default.
    It holds the connection's login (L{memcache_login.Login}) when its pool's
    or front's clients must log in (L{use_users}): the chosen parser is then
    the codec's login parser.
    """

    def __init__(self, pool_config):
        self.codec = text_codec
        self._pool_config = pool_config
        self._parser = None  # the text or binary parser, once chosen

    def feed(self, data: bytes) -> list:
        if not data:
            return []
        chosen = binary_codec if data[0] == memcache_binary.REQUEST_MAGIC else text_codec
        self._choose(chosen)
        return self._parser.feed(data)

    def _choose(self, chosen) -> None:
        if self.users is not None:
            self._parser = _LOGIN_PARSERS[chosen](chosen, self._pool_config, self)
        else:
            self._parser = chosen.request_parser(self._pool_config)
        self.codec = chosen
        self.feed = self._parser.feed  # later reads go straight to the chosen parser

    def use_users(self, users, locked: bool = True) -> None:
        """
        Clients log in as one of C{users} (None: they need not); a parser chosen
        already (a reload) is replaced by the one that fits, its unframed bytes kept.
        """
        memcache_login.Login.use_users(self, users, locked)
        parser = self._parser
        if parser is not None and isinstance(parser, _LOGIN_PARSER_TYPES) != (users is not None):
            rest = parser.unparsed()
            self._choose(self.codec)
            if rest:
                self._parser.feed(rest)  # not a whole frame: nothing comes out of it

    def state(self) -> dict:
        """The protocol sniffed (None before the first byte), the chosen parser's state, the login."""
        state = self.login_state()
        if self._parser is None:
            state["binary"] = None
        else:
            state.update(binary=self.codec is binary_codec, parser=self._parser.state())
        return state

    def restore(self, state: dict) -> None:
        """Go on from L{state} taken in another worker."""
        self.restore_login(state)
        if state.get("binary") is not None:
            self._choose(binary_codec if state["binary"] else text_codec)
            self._parser.restore(state.get("parser", {}))

    def unparsed(self) -> bytes:
        return b"" if self._parser is None else self._parser.unparsed()


def _codec_of(request):
    """The codec that framed C{request}: binary frames start with the request magic."""
    return binary_codec if request.frame[:1] == b"\x80" else text_codec


@implementer(ICodec)
class MemcacheCodec(object):
    """
    Text or binary per client connection.  The core uses the codec its parser
    chose; the methods here delegate by frame for any caller that does not.
    """

    name = "memcache"
    codecs = (text_codec, binary_codec)  # every codec a client may end up speaking

    def request_parser(self, pool_config):
        return SniffingRequestParser(pool_config)

    def reply_parser(self):
        """A text reply parser: backend connections made for this codec speak text."""
        return text_codec.reply_parser()

    def split(self, request, groups, strips=None):
        return _codec_of(request).split(request, groups, strips)

    def strip_keys(self, request, prefix):
        _codec_of(request).strip_keys(request, prefix)

    def restore_keys(self, request, raw, prefix):
        return _codec_of(request).restore_keys(request, raw, prefix)

    def denied_reply(self, request):
        return _codec_of(request).denied_reply(request)

    def part_data(self, request, keys):
        return _codec_of(request).part_data(request, keys)

    def merge(self, request, fragments):
        return _codec_of(request).merge(request, fragments)

    def join(self, request, replies):
        return _codec_of(request).join(request, replies)

    def filter_reply(self, request, raw):
        return _codec_of(request).filter_reply(request, raw)

    def error_reply(self, request, message):
        return _codec_of(request).error_reply(request, message)

    def classify_reply(self, request, raw):
        return REPLY_FINAL  # memcached has no redirects; failover routes act on failures

    def reply_failed(self, raw):
        return (binary_codec if raw[:1] == b"\x81" else text_codec).reply_failed(raw)

    def handshake(self, pool_config):
        return text_codec.handshake(pool_config)  # connections made for this codec speak text

    def probe_request(self):
        return text_codec.probe_request()

    def handshake_error(self, raw):
        return (binary_codec if raw[:1] == b"\x81" else text_codec).handshake_error(raw)

    def warmup_samples(self, pool_config):
        return text_codec.warmup_samples(pool_config) + binary_codec.warmup_samples(pool_config)


codec = MemcacheCodec()
