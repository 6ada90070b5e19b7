"""twemproxy's C{hash_tag:} rule: which part of a key is hashed (server_pool_idx)."""

from __future__ import annotations

from typing import Optional


def hash_tag_key(key: bytes, hash_tag: Optional[bytes]) -> bytes:
    """
    The part of C{key} twemproxy hashes under the two-byte C{hash_tag}
    (e.g. C{b"{}"}).

    That is what lies between the first left byte and the first right byte
    after it, when both exist and it is not empty; otherwise the whole key.
    Only that first pair counts: C{b"{}{a}"} hashes whole.  No tag (C{None}
    or C{b""}) hashes the whole key.
    """
    if not hash_tag:
        return key
    start = key.find(hash_tag[0])
    if start < 0:
        return key
    end = key.find(hash_tag[1], start + 1)
    # end is -1 when the right byte is missing, which also fails this test.
    if end - start > 1:
        return key[start + 1:end]
    return key
