"""Explicit registries of backends, one per stage kind.

The built-in backends are named in ``builder.backends.builtin`` and imported
only when asked for; ``Registry.register`` adds more and refuses a duplicate
name; anything else loads from a ``module:callable`` path, so a user's own
captioner or target model plugs in without touching this package.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

from builder.backends.builtin import BUILTIN_BACKENDS
from builder.backends.interfaces import Captioner, Generator, Similarity, Summarizer
from builder.errors import BackendError

_KINDS = ("target", "captioner", "summarizer", "generator", "similarity")
# what each kind must be (targets are checked by builder.backends.targets.load_target)
_INTERFACES: dict[str, type] = {
    "captioner": Captioner, "summarizer": Summarizer, "generator": Generator, "similarity": Similarity,
}


class Registry:
    """Name -> factory for one backend kind (``captioner``, ``generator``...)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._factories: dict[str, Callable[..., Any]] = {}
        self._lazy: dict[str, str] = {}

    def register(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator: register ``factory`` under ``name``; refuses duplicates."""

        def deco(factory: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._factories:
                raise BackendError(f"{self.kind} backend {name!r} is already registered")
            self._factories[name] = factory
            return factory

        return deco

    def register_lazy(self, name: str, path: str) -> None:
        """Register ``name`` for the factory at ``module:callable`` without
        importing it: heavy backends (transformers, diffusers) load only when
        a build uses them."""
        if name in self._factories or name in self._lazy:
            raise BackendError(f"{self.kind} backend {name!r} is already registered")
        self._lazy[name] = path

    def names(self) -> list[str]:
        """Registered names, sorted (for help texts and error messages)."""
        return sorted({*self._factories, *self._lazy})

    def factory(self, spec: str) -> Callable[..., Any]:
        """The factory for a registered name or a ``module:callable`` path."""
        if spec in self._factories:
            return self._factories[spec]
        if spec in self._lazy:
            return load_callable(self._lazy[spec])
        if ":" in spec:
            return load_callable(spec)
        raise BackendError(
            f"unknown {self.kind} backend {spec!r}; choose one of "
            f"{', '.join(self.names())} or give a module:callable path"
        )

    def create(self, spec: str, **kwargs: Any) -> Any:
        """Build the backend ``spec`` with keyword options from the config;
        refuses a factory that makes something other than this kind of backend."""
        factory = self.factory(spec)
        try:
            backend = factory(**kwargs)
        except TypeError as exc:
            raise BackendError(f"{self.kind} backend {spec!r}: bad options: {exc}") from exc
        check_backend(self.kind, spec, backend)
        return backend


def check_backend(kind: str, spec: str, backend: Any) -> None:
    """Raise BackendError unless ``backend`` implements the interface of
    ``kind`` (a subclass, or an object with every method the stages call):
    a spec naming some other callable fails here, not deep in a stage."""
    interface = _INTERFACES.get(kind)
    if interface is None or isinstance(backend, interface):
        return
    needed = ["name", *(n for n in dir(interface) if not n.startswith("_") and callable(getattr(interface, n)))]
    missing = [n for n in needed if not hasattr(backend, n)]
    if missing:
        raise BackendError(
            f"{kind} backend {spec!r} is not a {kind}: it made a {type(backend).__name__!r} value, which has "
            f"no {missing[0]!r}; name a {interface.__module__}.{interface.__name__} or a factory returning one"
        )


def load_callable(path: str) -> Callable[..., Any]:
    """Import ``module:attr`` (``attr`` may be dotted) and return the attribute."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise BackendError(f"{path!r} is not a module:callable path")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or whatever the module raises (relative names: TypeError)
        raise BackendError(f"cannot import {module_name!r} for {path!r}: {type(exc).__name__}: {exc}") from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise BackendError(f"{module_name!r} has no attribute {attr!r}") from exc
    if not callable(obj):
        raise BackendError(f"{path!r} is not callable")
    return obj


def create_backend(registry: Registry, spec: str, options: dict[str, Any], **context: Any) -> Any:
    """Create the backend ``spec`` with its config ``options``, passing context
    values (``device``, ``probe_dir``) only to factories that take them."""
    factory = registry.factory(spec)
    try:
        params = inspect.signature(factory).parameters
        takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
        extra = {k: v for k, v in context.items() if (takes_any or k in params) and k not in options}
    except (TypeError, ValueError):
        extra = {}
    return registry.create(spec, **options, **extra)


REGISTRIES: dict[str, Registry] = {kind: Registry(kind) for kind in _KINDS}
targets = REGISTRIES["target"]
captioners = REGISTRIES["captioner"]
summarizers = REGISTRIES["summarizer"]
generators = REGISTRIES["generator"]
similarities = REGISTRIES["similarity"]
for _kind, _table in BUILTIN_BACKENDS.items():
    for _name, _path in _table.items():
        REGISTRIES[_kind].register_lazy(_name, _path)
