"""Reading YAML a user wrote: safe tags only, and a bound on what aliases expand to.

``yaml.safe_load`` refuses Python tags but not a "billion laughs" file: nine levels of nine
aliases are 464 bytes that expand to 10⁹ values, so any code that walks or copies the result
(as the pipeline runner does) runs for minutes and ends in a MemoryError. `load_yaml` counts
the nodes of the document as if every alias were written out, while it is still a small graph
of shared nodes, and refuses it beyond `MAX_NODES`; it also refuses an alias that contains
itself. Every YAML alignpipe reads from a user (pipelines, fit configs, run folders, ``--set``
values) goes through it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, SequenceNode

from alignpipe.util.errors import AlignpipeError

MAX_NODES = 100_000  # values after alias expansion; the largest shipped pipeline has ~200


class YamlInputError(AlignpipeError):
    """A YAML file or value that is malformed, recursive or too large once expanded."""


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that checks the expanded size of each document before building it."""

    max_nodes = MAX_NODES

    def compose_document(self) -> Node | None:
        node = super().compose_document()
        if node is not None:
            _check_expanded_size(node, self.max_nodes)
        return node


class _TooLarge(Exception):
    pass


class _Recursive(Exception):
    pass


def _check_expanded_size(root: Node, limit: int) -> int:
    """Nodes in `root` with every alias written out; raises past `limit` or on a cycle."""
    sizes: dict[int, int] = {}  # a shared (aliased) node is sized once and counted per use
    open_nodes: set[int] = set()

    def size(node: Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise _Recursive
        open_nodes.add(key)
        if isinstance(node, SequenceNode):
            children = node.value
        elif isinstance(node, MappingNode):
            children = [part for pair in node.value for part in pair]
        else:
            children = []
        total = 1
        for child in children:
            total += size(child)
            if total > limit:
                raise _TooLarge
        open_nodes.discard(key)
        sizes[key] = total
        return total

    return size(root)


def _where(source: str | Path, where: str | None) -> str:
    if where:
        return where
    return str(source) if isinstance(source, Path) else "YAML text"


def load_yaml(source: str | Path, where: str | None = None, *, max_nodes: int = MAX_NODES) -> Any:
    """Parse YAML text, or the file at a `Path`, like ``yaml.safe_load`` but bounded.

    `where` names the input in messages (default: the path). Errors are `YamlInputError`s of
    one line naming the input, the line and the column.
    """
    label = _where(source, where)
    if isinstance(source, Path):
        try:
            text = source.read_text()
        except FileNotFoundError:
            raise YamlInputError(f"{label}: file not found") from None
        except UnicodeDecodeError as err:
            raise YamlInputError(f"{label}: not UTF-8 text ({err.reason} at byte "
                                 f"{err.start})") from None
    else:
        text = source
    loader = _BoundedLoader(text)
    loader.max_nodes = max_nodes
    try:
        return loader.get_single_data()
    except _TooLarge:
        raise YamlInputError(
            f"{label}: refused: its aliases expand to more than {max_nodes:,} values (a "
            f"'billion laughs' document?)") from None
    except _Recursive:
        raise YamlInputError(f"{label}: refused: an alias refers to a node that contains "
                             f"it (a recursive structure)") from None
    except RecursionError:
        raise YamlInputError(f"{label}: refused: nested too deeply") from None
    except yaml.YAMLError as err:
        raise YamlInputError(f"{label}: not valid YAML: {_one_line(err)}") from None
    finally:
        loader.dispose()


def _one_line(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None)
    if problem and mark is not None:
        context = getattr(err, "context", None)
        lead = f"{context}, " if context else ""
        return f"line {mark.line + 1}, column {mark.column + 1}: {lead}{problem}"
    return " ".join(str(err).split())
