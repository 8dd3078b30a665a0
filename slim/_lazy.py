"""Names a package exports but imports only on first use (PEP 562), so that a light module of it (a script's
`python -m slim.<module>`) does not pay for the heavy ones (torch, transformers) it never touches."""

from __future__ import annotations

import importlib
import sys

__all__ = ["lazy_exports"]


def lazy_exports(package: str, where: dict[str, str]):
    """The module `__getattr__` and `__dir__` of `package` for the names of `where` (name -> the submodule,
    relative to `package`, that defines it). A name, once imported, is kept in the package: the next access
    skips `__getattr__`."""
    namespace = sys.modules[package].__dict__

    def __getattr__(name: str):
        if name in where:
            value = getattr(importlib.import_module(f".{where[name]}", package), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__():
        return sorted(set(namespace) | set(where))

    return __getattr__, __dir__
