"""A name -> plug-in registry, one per family (tasks, pruning criteria, calibrators, ...)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from autocomp.errors import ConfigError, did_you_mean

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    value: T
    description: str


class Registry(Generic[T]):
    """Maps the names used in YAML and on the CLI to plug-ins, with a one-line description each."""

    def __init__(self, family: str) -> None:
        self.family = family
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, description: str) -> Callable[[T], T]:
        """Decorator: ``@REGISTRY.register("name", "what it does")``."""

        def add(value: T) -> T:
            self.add(name, value, description)
            return value

        return add

    def add(self, name: str, value: T, description: str) -> None:
        if name in self._entries:
            raise ValueError(f"{self.family} {name!r} is already registered.")
        self._entries[name] = Entry(name, value, description)

    def get(self, name: str, field: str | None = None) -> T:
        """The plug-in called ``name``; a ConfigError naming the field and the choices otherwise."""
        if name not in self._entries:
            hint = did_you_mean(name, self._entries)
            message = f"must name a registered {self.family} {self.names()}, but got {name!r}.{hint}"
            raise ConfigError(message, field or self.family)
        return self._entries[name].value

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(self._entries.values())
