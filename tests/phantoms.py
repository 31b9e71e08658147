"""Synthetic volumes shared by several test modules."""

from __future__ import annotations

import torch


def quantised_object(size: int = 48, seed: int = 0, texture_cells: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """An 8-bit-quantised textured ball ``[1, 1, size^3]`` in an exactly flat (zero) background, and its mask
    ``[size^3]``: the flat-and-quantised case of skull-stripped MRI and 8-bit atlases (ties in every cost)."""
    generator = torch.Generator().manual_seed(seed)
    axis = torch.linspace(-1, 1, size)
    radius = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij")).norm(dim=0)
    inside = radius < 0.6
    coarse = torch.rand(1, 1, texture_cells, texture_cells, texture_cells, generator=generator)
    texture = torch.nn.functional.interpolate(coarse, size=(size,) * 3, mode="trilinear", align_corners=True)
    image = torch.where(inside, 0.2 + 0.8 * texture, torch.zeros(()))
    return torch.round(image * 255) / 255, inside
