"""A registry of named plug-ins of one kind: a register decorator, a lookup and a wildcard list.

Every plug-in kind (methods, losses, ...) keeps one ``Registry`` and exposes it as a
``register_<kind>`` decorator and a ``list_<kind>s(pattern="*")`` function::

    LOSSES = Registry("loss")

    @LOSSES.register("infonce")
    class InfoNCE: ...

    LOSSES.get("infonce")        # the registered object
    LOSSES.names("info*")        # ["infonce"]

This module imports nothing of alignpipe but its errors, so any layer may use it.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from alignpipe.util.errors import AlignpipeError

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries of one plug-in kind; `kind` names it in messages ("unknown loss 'x'")."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        """Register `entry` under `name`; a name registered twice is a programming error."""
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} registered twice")
        self._entries[name] = entry
        return entry

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: register the decorated object under `name` and return it unchanged."""

        def wrap(entry: T) -> T:
            return self.add(name, entry)

        return wrap

    def get(self, name: str) -> T:
        """The entry named `name`, or an AlignpipeError listing the known names."""
        if name not in self._entries:
            known = ", ".join(self.names()) or "none"
            raise AlignpipeError(f"unknown {self.kind} {name!r}; known: {known}")
        return self._entries[name]

    def names(self, pattern: str = "*") -> list[str]:
        """Registered names matching a shell-style wildcard, sorted."""
        return sorted(n for n in self._entries if fnmatch.fnmatch(n, pattern))

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
