"""YAML that a person wrote (recipes, eval specs, the deployment policy, ``--set`` values), read one way.

``yaml.safe_load`` keeps the last of two equal keys without a word: a spec with ``grader:`` twice, or a
recipe with two ``sft:`` sections, ran with half of what its author wrote. Here a repeated key is an
error naming the key and both lines.
"""

from __future__ import annotations

from typing import Any

import yaml

from chatforge.errors import ChatforgeError

_MERGE_TAG = "tag:yaml.org,2002:merge"


class DuplicateKeyError(yaml.YAMLError):
    def __init__(self, key: Any, line: int, first: int) -> None:
        super().__init__(f"duplicate key {key!r} on line {line} (first on line {first})")
        self.key, self.line, self.first = key, line, first


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (at any depth)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                # `<<: *base` then an explicit key is YAML's way to override a merged one, not a repeat.
                if key_node.tag == _MERGE_TAG:
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    if key in seen:
                        raise DuplicateKeyError(key, line, seen[key])
                except TypeError:  # an unhashable key: the base constructor reports it
                    continue
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str) -> Any:
    """``yaml.safe_load`` that raises DuplicateKeyError (a ``yaml.YAMLError``) for a repeated key."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: plain data only


def load_yaml(text: str, where: str, error: type[ChatforgeError] = ChatforgeError) -> Any:
    """``text`` (from the file ``where``) as YAML; a syntax error or a repeated key is one line,
    ``where:LINE: ...``, raised as ``error``."""
    try:
        return parse_yaml(text)
    except DuplicateKeyError as e:
        raise error(f"{where}:{e.line}: duplicate key {e.key!r} (first on line {e.first})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f"{where}:{mark.line + 1}" if mark else where
        raise error(f"{at}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
