"""YAML parsing bounded in the size of what it builds.

yaml.safe_load refuses Python objects but not an alias bomb ("billion laughs"): a few lines whose
anchors refer to anchors nine levels deep expand into ~10^9 nodes and exhaust memory. Here the document
is composed first (a graph in which every alias is one shared node, so composing stays linear in the
text), its size with every alias expanded is counted over that graph with one entry per node, and only a
document within ``max_nodes`` is constructed into Python objects.

A mapping that names one key twice is refused too: yaml.safe_load keeps the last value without a word, so a
recipe with two ``train:`` sections would run on the second alone (or a repeated ``lr:`` silently win).
"""

from __future__ import annotations

import yaml

from peftkit.errors import UserError

DEFAULT_MAX_NODES = 100_000  # a recipe has a few hundred; a legitimate document of any kind here far fewer than this
DEFAULT_MAX_DEPTH = 200


def expanded_size(root: yaml.Node, max_nodes: int, max_depth: int) -> int:
    """Number of nodes of the document rooted at ``root`` with aliases expanded, stopping past ``max_nodes``.

    Raises ValueError for a self-referencing anchor (infinite when expanded) or nesting beyond ``max_depth``.
    Iterative, so a deep document cannot exhaust Python's stack here.
    """
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    depth = 0
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            on_path.discard(key)
            depth -= 1
            total = 1 + sum(sizes[id(c)] for c in _children(node))
            sizes[key] = min(total, max_nodes + 1)  # capped: the exact size of a bomb is not needed
            continue
        if key in sizes:
            continue
        if key in on_path:
            raise ValueError("an anchor refers to itself (its expansion never ends)")
        on_path.add(key)
        depth += 1
        if depth > max_depth:
            raise ValueError(f"nested more than {max_depth} levels deep")
        stack.append((node, True))
        for child in _children(node):
            if id(child) in on_path:
                raise ValueError("an anchor refers to itself (its expansion never ends)")
            if id(child) not in sizes:
                stack.append((child, False))
    return sizes[id(root)]


class DuplicateKeyError(UserError):
    """A mapping of the document names one key twice (the error names the key's path and both lines)."""


def first_duplicate_key(root: yaml.Node) -> tuple[str, int, int] | None:
    """(dotted path of the key, line of its first occurrence, line of its second) for the first mapping of the
    document rooted at ``root`` that names a key twice, else None. Lines count from 1.

    Keys are compared as the composer resolved them (tag and text): ``1`` and ``"1"`` are different keys, as they
    are once constructed. A merge (``<<: *base``) is not a duplicate of the keys it brings in: the mapping's own
    keys override those on purpose. Each node is visited once, so aliases cost nothing more here.
    """
    seen_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, str]] = [(root, "")]
    while stack:
        node, path = stack.pop()
        if id(node) in seen_nodes:
            continue
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first_line: dict[tuple[str, str], int] = {}
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode):
                    name = (key.tag, key.value)
                    line = key.start_mark.line + 1
                    if name in first_line and key.value != "<<":
                        return f"{path}{key.value}", first_line[name], line
                    first_line.setdefault(name, line)
                    stack.append((value, f"{path}{key.value}."))
                else:
                    stack.append((value, path))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((child, f"{path}{i}.") for i, child in enumerate(node.value))
    return None


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def load_yaml_bounded(text: str, max_nodes: int = DEFAULT_MAX_NODES, max_depth: int = DEFAULT_MAX_DEPTH,
                      source: str = "YAML document", loader_class: type = yaml.SafeLoader):
    """``yaml.safe_load(text)`` (or ``loader_class``, a SafeLoader subclass), refusing a document that expands past
    ``max_nodes`` nodes or ``max_depth`` levels, or names a key twice in one mapping.

    Syntax errors propagate as yaml.YAMLError (with line and column) and unconstructible values as the
    constructor raises them, for the caller to word; a too-large document is a UserError naming ``source``, a
    repeated key a DuplicateKeyError (a UserError) naming ``source``, the key and both lines.
    """
    loader = loader_class(text)
    try:
        try:
            root = loader.get_single_node()
        except RecursionError:
            raise UserError(f"{source} is nested too deeply to read. Write it with fewer levels.") from None
        if root is None:
            return None
        try:
            size = expanded_size(root, max_nodes, max_depth)
        except ValueError as e:
            raise UserError(f"{source} cannot be read: {e}. Write the values out instead of through anchors "
                            f"(&name) and aliases (*name).") from None
        if size > max_nodes:
            raise UserError(f"{source} expands to more than {max_nodes:,} values once its aliases (*name) are "
                            f"resolved; it is refused rather than built in memory. Write the values out or use "
                            f"fewer aliases.")
        duplicate = first_duplicate_key(root)
        if duplicate:
            key, first, second = duplicate
            raise DuplicateKeyError(
                f"{source} names the key {key!r} twice, at line {first} and at line {second}; YAML would keep only "
                f"the second and silently drop the first. Keep one of them (merge the two into one entry).")
        return loader.construct_document(root)
    finally:
        loader.dispose()
