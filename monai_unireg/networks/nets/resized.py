"""Run a registration network at its working size on a pair of any size."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from monai_unireg.spatial import resize_ddf, resize_image
from monai_unireg.validation import check_image_pair, check_integer

__all__ = ["ResizedRegistration"]


class ResizedRegistration(nn.Module):
    """Resize both images to ``size`` (trilinear, corner-aligned), register there and bring the field back.

    For networks trained at one input size (e.g. SACB-Net, whose sizes must be multiples of 16): the field is
    resized to the input grid with its values rescaled (:func:`monai_unireg.spatial.resize_ddf`), so it is in
    voxels of the input, MONAI ``Warp`` convention. A pair already at ``size`` goes through unchanged.

    Args:
        network: ``forward(moving, fixed) -> ddf`` at ``size``.
        size: working spatial size.
    """

    def __init__(self, network: nn.Module, size: Sequence[int]) -> None:
        super().__init__()
        self.network = network
        self.size = tuple(check_integer(s, "size", 1) for s in size)

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        """``[B, C, *S]`` pair -> ``[B, n, *S]`` displacement in voxels of the input grid."""
        check_image_pair(moving, fixed, len(self.size))
        shape = tuple(moving.shape[2:])
        if shape == self.size:
            return self.network(moving, fixed)
        ddf = self.network(resize_image(moving, self.size), resize_image(fixed, self.size))
        return resize_ddf(ddf, shape)
