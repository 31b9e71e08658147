"""Voxel-adaptive separable 3-tap Gaussian filtering (VoxelOpt's adaptive message passing, Sec. 2.4)."""

from __future__ import annotations

import torch

from monai_unireg.validation import check_image, check_integer

__all__ = ["adaptive_gaussian_filter"]


def _second_difference(x: torch.Tensor, axis: int, differentiable: bool) -> torch.Tensor:
    """``v(x - 1) + v(x + 1) - 2 v(x)`` along ``axis`` (2, 3 or 4), the volume edge replicated.

    Without autograd the sums are written straight into one new buffer; with it, through a padded copy.
    """
    length = x.shape[axis]
    if differentiable:
        padded = torch.cat([x.narrow(axis, 0, 1), x, x.narrow(axis, length - 1, 1)], axis)
        return padded.narrow(axis, 0, length) + padded.narrow(axis, 2, length) - 2 * x
    result = torch.empty_like(x)
    if length == 1:
        return result.zero_()
    torch.add(x.narrow(axis, 0, length - 2), x.narrow(axis, 2, length - 2), out=result.narrow(axis, 1, length - 2))
    torch.add(x.narrow(axis, 0, 1), x.narrow(axis, 1, 1), out=result.narrow(axis, 0, 1))
    torch.add(x.narrow(axis, length - 2, 1), x.narrow(axis, length - 1, 1), out=result.narrow(axis, length - 1, 1))
    return result.sub_(x, alpha=2)


def adaptive_gaussian_filter(x: torch.Tensor, sigma: torch.Tensor, passes: int = 1) -> torch.Tensor:
    """Filter every channel with a 3-tap Gaussian whose width varies per voxel, separably along each axis.

    Along one axis: ``y(x) = w_0(x) v(x) + w_1(x) (v(x - 1) + v(x + 1))`` with
    ``w_i(x) ~ exp(-i^2 / (2 sigma(x)^2))``, ``i in {-1, 0, 1}``, normalised to sum to 1, so a voxel with a
    small ``sigma`` (a confident, low-entropy displacement) keeps its value and one with a large ``sigma``
    takes more from its neighbours. The weights belong to the receiving voxel; the volume edge is replicated.
    ``sigma = 0`` is the identity.

    Args:
        x: ``[B, C, D, H, W]`` values to filter (cost volume channels or displacement components).
        sigma: ``[B, 1, D, H, W]`` per-voxel standard deviation in voxels, >= 0.
        passes: how many times the three axis filters are applied.

    Returns:
        ``[B, C, D, H, W]`` filtered values.
    """
    check_image(x, "x", finite=False)
    check_image(sigma, "sigma", finite=False)
    if sigma.shape[0] != x.shape[0] or sigma.shape[1] != 1 or sigma.shape[2:] != x.shape[2:]:
        raise ValueError(f"sigma must have shape [{x.shape[0]}, 1, *{tuple(x.shape[2:])}], got {tuple(sigma.shape)}.")
    check_integer(passes, "passes", 0)
    side = torch.exp(-0.5 / sigma.clamp(min=1e-6).square())
    side_weight = side / (1 + 2 * side)
    needs_graph = torch.is_grad_enabled() and (x.requires_grad or sigma.requires_grad)
    for _ in range(passes):
        for axis in (2, 3, 4):
            # w_0 v + w_1 (v_prev + v_next) = v + w_1 (v_prev + v_next - 2 v), with w_0 = 1 - 2 w_1
            difference = _second_difference(x, axis, needs_graph)
            if needs_graph:
                x = torch.addcmul(x, difference, side_weight)
            else:  # the difference buffer is fresh: update it in place (a third less memory traffic)
                x = difference.mul_(side_weight).add_(x)
    return x
