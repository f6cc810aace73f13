"""Read a recipe file (YAML or JSON) on a budget: a recipe is a few kilobytes of plain data.

YAML aliases share one node many times, so 433 bytes of nested aliases ("billion laughs") stand
for a document of millions of nodes: whatever walks it (validation, an error message quoting a
value, the recipe written as JSON into the output's metadata) pays for the expanded size. PyYAML
composes a node graph before building Python objects, so the loader here counts as it composes:
nodes made, nesting depth, and the *expanded* size of each node (aliases counted as the copies
they stand for), and refuses the document past any budget, before anything walks it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode

from lazymerge.errors import RecipeError

__all__ = ["MAX_DEPTH", "MAX_EXPANDED", "MAX_NODES", "MAX_RECIPE_BYTES", "read_recipe_file"]

# Real recipes (mergekit configs with per-layer slices included) are well under these.
MAX_RECIPE_BYTES = 1 << 20
MAX_NODES = 100_000  # composed nodes (PyYAML spends ~0.5 KB on each while composing)
MAX_EXPANDED = 1 << 20  # nodes plus scalar characters, with every alias expanded
MAX_DEPTH = 64

_HINT = "a recipe is plain YAML or JSON of a few kilobytes; anchors and aliases may not expand it much"


class _Refused(Exception):
    pass


class _BudgetLoader(yaml.SafeLoader):
    """SafeLoader that refuses a document whose composition exceeds the budget."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._nodes = 0
        self._depth = 0
        self._weights: dict[int, int] = {}  # id(node) -> expanded size, known once it is complete

    def compose_node(self, parent: Node | None, index: object) -> Node:
        if self.check_event(yaml.AliasEvent):
            node = super().compose_node(parent, index)
            if id(node) not in self._weights:  # still being composed: it contains its own alias
                raise _Refused("an alias refers to a node that contains it (a recursive alias)")
            return node
        self._nodes += 1
        self._depth += 1
        if self._nodes > MAX_NODES:
            raise _Refused(f"it has more than {MAX_NODES:,} nodes")
        if self._depth > MAX_DEPTH:
            raise _Refused(f"it is nested more than {MAX_DEPTH} levels deep")
        node = super().compose_node(parent, index)
        self._depth -= 1
        weight = self._weigh(node)
        if weight > MAX_EXPANDED:
            raise _Refused(f"its aliases expand it past {MAX_EXPANDED:,} nodes and characters")
        self._weights[id(node)] = weight
        return node

    def _weigh(self, node: Node) -> int:
        if isinstance(node, ScalarNode):
            return 1 + len(node.value)
        children = [c for pair in node.value for c in pair] if isinstance(node, MappingNode) else node.value
        return 1 + sum(self._weights[id(c)] for c in children)


def read_recipe_file(path: str | os.PathLike[str]) -> object:
    """Parse a recipe file: JSON when it ends in `.json`, YAML (safe, budgeted) otherwise.

    Returns whatever the document holds (the caller checks it is a mapping).

    Raises:
        RecipeError: the file cannot be read, is larger than `MAX_RECIPE_BYTES`, is not valid
            YAML/JSON, or its nodes, nesting or alias expansion exceed the budget (one line).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_RECIPE_BYTES:
            raise RecipeError(f"recipe {path} is {size:,} bytes; a recipe is at most {MAX_RECIPE_BYTES:,}", hint=_HINT)
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RecipeError(f"cannot read recipe {path}: {exc.strerror}", hint="pass the path of a YAML config") from None
    except UnicodeDecodeError:
        raise RecipeError(f"{path} is not valid YAML/JSON: not UTF-8 text") from None
    try:
        if path.suffix == ".json":
            return json.loads(text)
        loader = _BudgetLoader(text)
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except _Refused as exc:
        raise RecipeError(f"{path} is refused: {exc}", hint=_HINT) from None
    except yaml.MarkedYAMLError as exc:  # where the parser stopped, as an editor shows it (1-based)
        mark = exc.problem_mark or exc.context_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        what = "; ".join(x for x in (exc.context, exc.problem) if x) or type(exc).__name__
        raise RecipeError(f"{path} is not valid YAML/JSON{where}: {what}") from None
    except json.JSONDecodeError as exc:
        raise RecipeError(f"{path} is not valid YAML/JSON (line {exc.lineno}, column {exc.colno}): {exc.msg}") from None
    except Exception as exc:  # other yaml/json errors (RecursionError included): one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RecipeError(f"{path} is not valid YAML/JSON: {first}") from None
