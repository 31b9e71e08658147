"""monai_unireg: universal deformable 3D medical image registration for MONAI.

Conventions (see ``docs``/DESIGN): tensors are channel-first ``[B, C, D, H, W]``; a displacement field
``ddf`` has shape ``[B, 3, D, H, W]`` in voxels of its grid, MONAI ``Warp`` convention:
``warped(x) = moving(x + ddf(x))``.

The subpackages are imported on first use (``monai_unireg.losses`` or ``from monai_unireg import losses`` both
work), so ``import monai_unireg`` and the command line's ``--help`` do not pay for importing torch and MONAI.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: Subpackages and modules reachable as attributes of the package (imported lazily on first access, PEP 562), so a
#: bundle config's ``$monai_unireg.engines.X`` after ``import monai_unireg`` works as before.
_SUBMODULES = (
    "data",
    "engines",
    "filtering",
    "io",
    "losses",
    "metrics",
    "networks",
    "spatial",
    "transforms",
    "validation",
    "visualize",
)

__all__ = ["data", "io", "losses", "metrics", "spatial", "transforms", "validation", "__version__"]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        module = importlib.import_module(f"{__name__}.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SUBMODULES))
