"""
One located tree for both configuration front ends.

YAML text and plain Python data both become a tree of L{ConfigNode}s, so the
loader validates a single shape and can name the line of every value.  YAML is
read with C{yaml.compose()} (safe loader, no object construction beyond plain
scalars) because the composed nodes keep their marks and keep duplicate
mapping keys, which a plain C{safe_load} would silently collapse.
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

import yaml
from yaml.constructor import ConstructorError, SafeConstructor

MAPPING = "mapping"
SEQUENCE = "sequence"
SCALAR = "scalar"

_MAPPING_TAG = "tag:yaml.org,2002:map"
_SEQUENCE_TAG = "tag:yaml.org,2002:seq"
_MERGE_TAG = "tag:yaml.org,2002:merge"


class SourceError(Exception):
    """The text could not be turned into a tree at all (bad YAML, unsupported tag)."""

    def __init__(self, line: Optional[int], message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message


class ConfigNode:
    """
    One value of the configuration, with where it came from.

    C{kind} is L{MAPPING} (C{value} is a list of C{(key node, value node)}
    pairs in source order, duplicates kept), L{SEQUENCE} (C{value} is a list of
    nodes) or L{SCALAR} (C{value} is the Python value: str, int, float, bool,
    None...).  C{line} is 1-based, or None for data that did not come from a
    file.  C{plain_text} is the scalar exactly as written when it was an
    unquoted YAML scalar, else None: twemproxy reads every value as text, so the
    loader sometimes prefers the text to YAML 1.1's reading of it (C{0400},
    C{yes}, C{1:30}).
    """

    __slots__ = ("kind", "value", "line", "plain_text")

    def __init__(self, kind: str, value: Any, line: Optional[int] = None,
                 plain_text: Optional[str] = None) -> None:
        self.kind = kind
        self.value = value
        self.line = line
        self.plain_text = plain_text

    def __repr__(self) -> str:
        return "ConfigNode(%s, %r, line=%r)" % (self.kind, self.value, self.line)


def from_yaml(text: str) -> Optional[ConfigNode]:
    """
    The tree of a single YAML document, or None when the document is empty.

    @raise SourceError: on a YAML syntax error, a second document, an
        unsupported tag or an alias that refers to itself.
    """
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        raise SourceError(_mark_line(e), "invalid YAML: " + _describe_yaml_error(e))
    except yaml.YAMLError as e:
        raise SourceError(None, "invalid YAML: %s" % (e,))
    if root is None:
        return None
    return _convert(root, SafeConstructor(), set())


def from_python(data: Any) -> ConfigNode:
    """The tree of plain Python data (dicts, lists/tuples and scalars), without lines."""
    if isinstance(data, dict):
        return ConfigNode(MAPPING, [(from_python(k), from_python(v)) for k, v in data.items()])
    if isinstance(data, (list, tuple)):
        return ConfigNode(SEQUENCE, [from_python(item) for item in data])
    return ConfigNode(SCALAR, data)


def _mark_line(error: yaml.MarkedYAMLError) -> Optional[int]:
    mark = error.problem_mark or error.context_mark
    return mark.line + 1 if mark is not None else None


def _describe_yaml_error(error: yaml.MarkedYAMLError) -> str:
    parts: List[str] = []
    if error.context:
        parts.append(error.context)
    if error.problem:
        parts.append(error.problem)
    text = ", ".join(parts) or "syntax error"
    mark = error.problem_mark or error.context_mark
    if mark is not None:
        text += " (column %d)" % (mark.column + 1,)
    return text


def _convert(node: yaml.Node, constructor: SafeConstructor, open_nodes: set) -> ConfigNode:
    line = node.start_mark.line + 1
    if isinstance(node, yaml.ScalarNode):
        if node.tag == _MERGE_TAG:
            raise SourceError(line, "YAML merge keys ('<<') are not supported")
        try:
            value = constructor.construct_object(node)
        except ConstructorError:
            raise SourceError(line, "unsupported YAML tag %r" % (node.tag,))
        plain_text = node.value if node.style is None else None
        return ConfigNode(SCALAR, value, line, plain_text)

    # An alias may point back at a collection that is still being walked.
    if id(node) in open_nodes:
        raise SourceError(line, "a YAML alias refers to the collection that contains it")
    open_nodes.add(id(node))
    try:
        if isinstance(node, yaml.MappingNode):
            if node.tag != _MAPPING_TAG:
                raise SourceError(line, "unsupported YAML tag %r" % (node.tag,))
            pairs: List[Tuple[ConfigNode, ConfigNode]] = [
                (_convert(k, constructor, open_nodes), _convert(v, constructor, open_nodes))
                for k, v in node.value
            ]
            return ConfigNode(MAPPING, pairs, line)
        if node.tag != _SEQUENCE_TAG:
            raise SourceError(line, "unsupported YAML tag %r" % (node.tag,))
        items = [_convert(item, constructor, open_nodes) for item in node.value]
        return ConfigNode(SEQUENCE, items, line)
    finally:
        open_nodes.discard(id(node))
