"""Lazy attributes of a package (PEP 562): a name is imported from its module on first access.

The subpackages use it so that importing one light module (``monai_unireg.engines.pair_registration`` on the
command line's path) does not import every sibling and, through them, all of MONAI (about 3 s of the command's
start measured with ``python -X importtime``; ``benchmarks/register_stages.py``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["lazy_attributes"]


def lazy_attributes(
    namespace: dict[str, Any], exports: Mapping[str, str], submodules: Sequence[str] = ()
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for the package whose ``globals()`` is ``namespace``.

    Args:
        namespace: the package's ``globals()``.
        exports: attribute name -> module it comes from (relative to ``package`` when it starts with ``.``,
            absolute otherwise); the attribute of that module with the same name is returned.
        submodules: names of submodules reachable as attributes (``package.name``).

    Each value is stored in the package's namespace on first access, so later lookups cost nothing. A name that is
    both an export and a submodule (``networks.blocks.kmeans``, the function of ``networks/blocks/kmeans.py``) is
    imported at once: importing the submodule (``import package.name``, anywhere) sets the package's attribute to the
    module, which would otherwise shadow the export depending on what was imported first.
    """
    package = namespace["__name__"]
    for name in set(exports) & set(submodules):
        namespace[name] = getattr(importlib.import_module(exports[name], package), name)

    def __getattr__(name: str) -> Any:
        if name in exports:
            value = getattr(importlib.import_module(exports[name], package), name)
        elif name in submodules:
            value = importlib.import_module(f".{name}", package)
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports) | set(submodules))

    return __getattr__, __dir__
