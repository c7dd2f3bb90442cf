"""One registry helper for every name -> function table (advantage estimators, policy losses, rewards).

A `Registry` is a dict that refuses a second registration of a name (a silent overwrite would change what a config
means) and whose lookup error lists the valid choices.
"""

from __future__ import annotations

from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)


class Registry(dict):
    """kind: what the entries are, for messages ('advantage estimator', 'policy loss', 'reward')."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def register(self, name: str) -> Callable[[F], F]:
        """Decorator: registers the function under `name`; a duplicate name is a ValueError."""
        def deco(fn: F) -> F:
            if name in self:
                raise ValueError(f"{self.kind} {name!r} is registered twice ({self[name].__module__}."
                                 f"{self[name].__qualname__} and {fn.__module__}.{fn.__qualname__})")
            self[name] = fn
            return fn
        return deco

    def get_fn(self, name: str) -> Callable:
        """The function registered as `name`; a KeyError naming the valid choices otherwise."""
        if name not in self:
            raise KeyError(f"unknown {self.kind} {name!r}; registered: {sorted(self)}")
        return self[name]
