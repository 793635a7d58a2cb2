"""One small Registry class: every extension point (codecs, cost and loss terms, backbones, necks, presets,
model architectures) is an instance."""
from __future__ import annotations

import fnmatch
from typing import Callable, Iterator, TypeVar

T = TypeVar("T")


class Registry:
    """A named table of callables.

    >>> CODECS = Registry("codec")
    >>> @CODECS.register("pca")
    ... class PCACodec: ...
    >>> CODECS.get("pca") is PCACodec
    True
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Callable] = {}

    def register(self, name: str | None = None, *, override: bool = False) -> Callable[[T], T]:
        """Decorator registering a callable under `name` (default: its __name__)."""

        def decorator(obj: T) -> T:
            key = name or obj.__name__
            if not isinstance(key, str) or not key:
                raise TypeError(f"{self.kind} names must be non-empty strings, got {key!r}")
            if key in self._entries and not override:
                raise KeyError(f"{self.kind} {key!r} is already registered; pass override=True to replace it")
            self._entries[key] = obj
            return obj

        return decorator

    def get(self, name: str) -> Callable:
        """The entry registered as `name`; a KeyError listing the known names otherwise."""
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            known = ", ".join(sorted(self._entries)) or "(none)"
            raise KeyError(f"unknown {self.kind} {name!r}; known {self.kind}s: {known}") from None

    def unregister(self, name: str) -> Callable:
        """Remove and return the entry registered as `name` (KeyError listing the known names otherwise)."""
        entry = self.get(name)
        del self._entries[name]
        return entry

    def list(self, pattern: str = "*") -> list[str]:
        """Sorted names matching a shell-style wildcard, e.g. 'istr_r50*'."""
        return sorted(n for n in self._entries if fnmatch.fnmatchcase(n, pattern))

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.list()})"
