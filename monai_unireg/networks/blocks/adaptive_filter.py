"""Voxel-adaptive separable 3-tap Gaussian filtering (VoxelOpt's adaptive message passing, Sec. 2.4)."""

from __future__ import annotations

import torch

from monai_unireg.validation import check_image, check_integer

__all__ = ["adaptive_gaussian_filter"]


def _second_difference(x: torch.Tensor, axis: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """``v(x - 1) + v(x + 1) - 2 v(x)`` along ``axis`` (2, 3 or 4), the volume edge replicated.

    With ``out`` (no autograd) the sums are written straight into that buffer, which must not overlap ``x``;
    without it, the result is built through a padded copy, which autograd can differentiate.
    """
    length = x.shape[axis]
    if out is None:
        padded = torch.cat([x.narrow(axis, 0, 1), x, x.narrow(axis, length - 1, 1)], axis)
        return padded.narrow(axis, 0, length) + padded.narrow(axis, 2, length) - 2 * x
    if length == 1:
        return out.zero_()
    torch.add(x.narrow(axis, 0, length - 2), x.narrow(axis, 2, length - 2), out=out.narrow(axis, 1, length - 2))
    torch.add(x.narrow(axis, 0, 1), x.narrow(axis, 1, 1), out=out.narrow(axis, 0, 1))
    torch.add(x.narrow(axis, length - 2, 1), x.narrow(axis, length - 1, 1), out=out.narrow(axis, length - 1, 1))
    return out.sub_(x, alpha=2)


def adaptive_gaussian_filter(x: torch.Tensor, sigma: torch.Tensor, passes: int = 1) -> torch.Tensor:
    """Filter every channel with a 3-tap Gaussian whose width varies per voxel, separably along each axis.

    Along one axis: ``y(x) = w_0(x) v(x) + w_1(x) (v(x - 1) + v(x + 1))`` with
    ``w_i(x) ~ exp(-i^2 / (2 sigma(x)^2))``, ``i in {-1, 0, 1}``, normalised to sum to 1, so a voxel with a
    small ``sigma`` (a confident, low-entropy displacement) keeps its value and one with a large ``sigma``
    takes more from its neighbours. The weights belong to the receiving voxel; the volume edge is replicated.
    ``sigma = 0`` is the identity, and so is any ``sigma`` whose side weight is below the dtype's ``eps``
    (``sigma < 0.18`` in float32): such weights change no representable value of order one.

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
    # weights below the dtype's resolution change nothing representable but would drive the updates into
    # denormal numbers, which the CPU computes many times slower: they are set to exactly 0
    side_weight = side_weight.masked_fill(side_weight < torch.finfo(side_weight.dtype).eps, 0.0)
    if torch.is_grad_enabled() and (x.requires_grad or sigma.requires_grad):
        for _ in range(passes):
            for axis in (2, 3, 4):
                # w_0 v + w_1 (v_prev + v_next) = v + w_1 (v_prev + v_next - 2 v), with w_0 = 1 - 2 w_1
                x = torch.addcmul(x, _second_difference(x, axis), side_weight)
        return x
    # without autograd: the axis filters alternate between two buffers, each result overwriting the difference
    # it was computed from (two allocations per call, whatever the number of passes; the input is not modified)
    buffers = [torch.empty_like(x), torch.empty_like(x) if passes * 3 > 1 else None]
    for step in range(passes * 3):
        out = buffers[step % 2]
        x = torch.addcmul(x, _second_difference(x, 2 + step % 3, out), side_weight, out=out)
    return x
