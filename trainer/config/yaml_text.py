"""YAML text of configs, both ways: a strict reader (a repeated key is an error, not a silent overwrite)
and the writer in the presets' style."""

from __future__ import annotations

from typing import Any

import yaml

from .coerce import join


class DuplicateKey(Exception):
    """A mapping of a YAML document repeats a key: its dotted path and the two 1-based lines."""

    def __init__(self, key: str, first: int, second: int):
        super().__init__(f"key '{key}' is given twice (lines {first} and {second}); keep one")


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a repeated key in a mapping, where PyYAML keeps the last one silently
    (``lr`` written twice in a long file: one of the two values is ignored without a word).

    Keys brought in by a merge (``<<: *base``) may be overridden by the mapping's own keys, as YAML intends;
    only the mapping's own keys must be unique.
    """

    def construct_document(self, node):
        # Dotted paths of the document's mappings, for messages: construct_mapping sees one node at a time.
        self._paths: dict[int, str] = {}
        stack = [(node, "")]
        while stack:
            current, path = stack.pop()
            if isinstance(current, yaml.MappingNode):
                self._paths[id(current)] = path
                for key, value in current.value:
                    name = key.value if isinstance(key, yaml.ScalarNode) else "?"
                    stack.append((value, join(path, str(name))))
            elif isinstance(current, yaml.SequenceNode):
                stack.extend((item, f"{path}[{i}]") for i, item in enumerate(current.value))
        return super().construct_document(node)

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first_line: dict[object, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                if key in first_line:
                    raise DuplicateKey(join(self._paths.get(id(node), ""), str(key)), first_line[key], line)
                first_line[key] = line
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` that raises :class:`DuplicateKey` for a repeated key."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 -- a SafeLoader subclass


class _Dumper(yaml.SafeDumper):
    """Sections in block style, lists inline (``budgets: [4000, 2000]``), as the presets are written."""


_Dumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))


def dump_yaml(data: dict[str, Any]) -> str:
    """``data`` as YAML in the presets' style, keys in their order."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=False)
