"""monai_unireg: universal deformable 3D medical image registration for MONAI.

Conventions (see ``docs``/DESIGN): tensors are channel-first ``[B, C, D, H, W]``; a displacement field
``ddf`` has shape ``[B, 3, D, H, W]`` in voxels of its grid, MONAI ``Warp`` convention:
``warped(x) = moving(x + ddf(x))``.
"""

__version__ = "0.1.0"

from monai_unireg import data, io, losses, metrics, spatial, transforms, validation  # noqa: E402

__all__ = ["data", "io", "losses", "metrics", "spatial", "transforms", "validation", "__version__"]
