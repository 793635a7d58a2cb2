"""One small Registry class: every extension point (codecs, cost and loss terms, backbones, necks, presets,
model architectures) is an instance."""
from __future__ import annotations

import fnmatch
from typing import Any, Callable, Iterator, TypeVar

T = TypeVar("T")


class Registry:
    """A named table of callables. Registering has the same effects in every registry: the entry is stored under
    its name and tagged with attributes: `name_attr` (if the registry has one) set to the name, the registry's
    `defaults` and the keywords given to register(). `required`: methods an entry must have.

    >>> CODECS = Registry("codec", name_attr="codec_name")
    >>> @CODECS.register("pca")
    ... class PCACodec: ...
    >>> CODECS.get("pca") is PCACodec and PCACodec.codec_name == "pca"
    True
    """

    def __init__(self, kind: str, *, name_attr: str | None = None, defaults: dict[str, Any] | None = None,
                 required: tuple[str, ...] = ()) -> None:
        self.kind, self.name_attr, self.required = kind, name_attr, tuple(required)
        self.defaults = dict(defaults or {})
        self._entries: dict[str, Callable] = {}

    def register(self, name: str | None = None, *, override: bool = False, **attributes: Any) -> Callable[[T], T]:
        """Decorator registering a callable under `name` (default: its __name__), tagged with `attributes` (over the
        registry's defaults; unknown keywords are a TypeError) and, if the registry has a name_attr, its name."""
        unknown = sorted(set(attributes) - set(self.defaults))
        if unknown:
            raise TypeError(f"register() of a {self.kind} takes the attributes {sorted(self.defaults) or 'none'}, "
                            f"got {unknown}")

        def decorator(obj: T) -> T:
            key = name or obj.__name__
            if not isinstance(key, str) or not key:
                raise TypeError(f"{self.kind} names must be non-empty strings, got {key!r}")
            if key in self._entries and not override:
                raise KeyError(f"{self.kind} {key!r} is already registered; pass override=True to replace it")
            missing = [m for m in self.required if not callable(getattr(obj, m, None))]
            if missing:
                raise TypeError(f"{self.kind} {key!r}: {getattr(obj, '__name__', obj)} must define {missing}")
            for attr, value in {**self.defaults, **attributes}.items():
                setattr(obj, attr, tuple(value) if isinstance(value, list) else value)
            if self.name_attr:
                setattr(obj, self.name_attr, key)
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
