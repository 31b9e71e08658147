"""A synthetic registration pair with a known deformation, for demos and tests on machines without data."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.transforms import GaussianSmooth

from monai_unireg import io, spatial
from monai_unireg.validation import check_integer, check_positive

__all__ = ["SyntheticPair", "make_synthetic_pair"]

#: (centre offset in fractions of the half-size, radii in fractions of the half-size, label, intensity)
STRUCTURES = (
    ((0.0, 0.0, 0.0), (0.8, 0.82, 0.8), 1, 0.35),
    ((0.0, 0.0, 0.0), (0.44, 0.5, 0.44), 2, 0.6),
    ((-0.25, 0.17, 0.06), (0.16, 0.17, 0.16), 3, 0.9),
    ((0.28, -0.2, -0.1), (0.13, 0.2, 0.19), 4, 0.2),
)


@dataclass
class SyntheticPair:
    """Fixed and moving volumes ``[1, 1, *S]`` (labels ``int16``) on one grid, with the true fields ``[1, 3, *S]``.

    ``warp(moving, true_ddf) ~ fixed``; ``moving = warp(fixed, inverse_ddf)``.
    """

    fixed: torch.Tensor
    moving: torch.Tensor
    fixed_label: torch.Tensor
    moving_label: torch.Tensor
    affine: np.ndarray
    true_ddf: torch.Tensor
    inverse_ddf: torch.Tensor

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm."""
        return tuple(float(s) for s in spatial.spacing_from_affine(self.affine))

    def save(self, folder: str | os.PathLike) -> dict[str, Path]:
        """Write ``fixed``, ``moving``, ``fixed_label``, ``moving_label`` and ``true_ddf`` as NIfTI in ``folder``."""
        folder = Path(folder)
        paths = {name: folder / f"{name}.nii.gz" for name in ("fixed", "moving", "fixed_label", "moving_label")}
        for name, path in paths.items():
            io.save_nifti(getattr(self, name)[0, 0], self.affine, path)
        paths["true_ddf"] = io.save_ddf(self.true_ddf, self.affine, folder / "true_ddf.nii.gz")
        return paths


def _phantom(shape: tuple[int, ...], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    half = torch.tensor([(s - 1) / 2 for s in shape]).view(3, 1, 1, 1)
    grid = (spatial.identity_grid(shape) - half) / half
    labels = torch.zeros(shape, dtype=torch.int16)
    intensity = torch.zeros(shape)
    for centre, radii, value, brightness in STRUCTURES:
        inside = (((grid - torch.tensor(centre).view(3, 1, 1, 1)) / torch.tensor(radii).view(3, 1, 1, 1)) ** 2).sum(0)
        labels[inside <= 1] = value
        intensity[inside <= 1] = brightness
    image = (intensity + 0.02 * torch.randn(shape, generator=generator)).clamp(0, 1)
    return image[None, None], labels[None, None]


def _velocity(shape: tuple[int, ...], max_displacement: float, generator: torch.Generator) -> torch.Tensor:
    """White noise on a 6^3 grid, upsampled and Gaussian-smoothed (sigma ~ a tenth of the size), scaled."""
    coarse = torch.randn(1, 3, 6, 6, 6, generator=generator)
    noise = torch.nn.functional.interpolate(coarse, size=shape, mode="nearest")[0]
    velocity = GaussianSmooth(sigma=max(min(shape) / 10, 1.0))(noise).as_tensor()[None]
    return velocity * (max_displacement / velocity.abs().max())


def make_synthetic_pair(
    shape: tuple[int, int, int] = (64, 72, 64),
    spacing: float = 2.0,
    max_displacement: float = 3.0,
    seed: int = 0,
) -> SyntheticPair:
    """A phantom (nested and side-by-side ellipsoids, labels 1-4, noise) and a smooth diffeomorphism of it.

    The deformation is ``exp(v)`` for a smooth random velocity ``v`` (largest component ``max_displacement``
    voxels) integrated by scaling and squaring; the moving image is the fixed image warped by ``exp(-v)``, so
    the true registration field is ``exp(v)`` up to interpolation. The grid has ``spacing`` mm voxels, is
    rotated 10 degrees about the z axis and centred on the world origin (an oblique affine on purpose).

    Args:
        shape: spatial shape, each at least 8.
        spacing: isotropic voxel size in mm.
        max_displacement: largest velocity component in voxels.
        seed: random seed of the noise and the deformation.
    """
    if len(shape) != 3 or any(check_integer(s, "shape", 8) < 8 for s in shape):
        raise ValueError(f"shape must list 3 integers >= 8, got {shape!r}.")
    check_positive(spacing, "spacing")
    check_positive(max_displacement, "max_displacement", allow_zero=True)
    generator = torch.Generator().manual_seed(check_integer(seed, "seed", 0))
    shape = tuple(int(s) for s in shape)
    fixed, fixed_label = _phantom(shape, generator)
    velocity = _velocity(shape, max_displacement, generator)
    true_ddf, inverse_ddf = spatial.integrate_velocity(velocity), spatial.integrate_velocity(-velocity)
    angle = np.deg2rad(10.0)
    affine = np.eye(4)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine[:3, :3] = rotation * spacing
    affine[:3, 3] = -affine[:3, :3] @ (np.array(shape) - 1) / 2
    return SyntheticPair(
        fixed=fixed,
        moving=spatial.warp(fixed, inverse_ddf),
        fixed_label=fixed_label,
        moving_label=spatial.warp_labels(fixed_label, inverse_ddf),
        affine=affine,
        true_ddf=true_ddf,
        inverse_ddf=inverse_ddf,
    )
