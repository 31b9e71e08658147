"""Field and label terms of the learned methods' objectives: forward-difference diffusion and soft label Dice."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from monai_unireg import spatial
from monai_unireg.validation import check_ddf, check_integer, check_same_spatial_shape

__all__ = ["diffusion_regularisation", "diffusion_gradient", "soft_dice_loss"]


def diffusion_regularisation(ddf: torch.Tensor) -> torch.Tensor:
    r"""The smoothness term ``L_reg = ||grad phi||_2^2`` of Eq. 1, as the reference code computes it.

    .. math::

        L_{reg}(u) = \frac{1}{3} \sum_{d=1}^{3} \operatorname{mean}_{b, c, x} \big(u_c(x + e_d) - u_c(x)\big)^2

    (forward differences in voxels; the mean runs over the batch, the 3 components and the ``N - 1`` differences
    along axis ``d``). For a linear field ``u(x) = A x`` it is ``||A||_F^2 / 9``.

    ``monai.losses.DiffusionLoss`` (re-exported by :mod:`monai_unireg.losses`) is *not* used: it takes central
    differences ``(u(x + e_d) - u(x - e_d)) / 2`` on the interior and *sums* the three axes' means, so it is
    3 times this value on linear fields (the published lambdas would be 3 times too strong) and it is blind to a
    field alternating voxel by voxel (its central differences vanish), which forward differences penalise.

    Args:
        ddf: ``[B, 3, D, H, W]`` displacement in voxels (every spatial size at least 2).

    Returns:
        the scalar loss (float32 at least).
    """
    check_ddf(ddf, "ddf")
    if min(ddf.shape[2:]) < 2:
        raise ValueError(f"ddf must have at least 2 voxels along every axis, got shape {tuple(ddf.shape)}.")
    ddf = ddf.to(torch.promote_types(ddf.dtype, torch.float32))
    return torch.stack([torch.diff(ddf, dim=axis).square().mean() for axis in (2, 3, 4)]).mean()


def diffusion_gradient(ddf: torch.Tensor) -> torch.Tensor:
    r"""The gradient of :func:`diffusion_regularisation` with respect to ``ddf``, written out (no autograd), for
    optimisers that assemble their gradient by hand (:mod:`monai_unireg.engines.refinement`).

    With ``d_k = u(x + e_k) - u(x)`` along axis ``k`` and ``M_k`` the number of those differences (batch x
    components x voxels that have a neighbour along ``k``), ``L = \frac{1}{3} \sum_k \|d_k\|^2 / M_k`` and

    .. math::

        \frac{\partial L}{\partial u(x)} = \frac{2}{3} \sum_k \frac{d_k(x - e_k) - d_k(x)}{M_k}

    (a difference missing at the border counts as 0); tested against autograd in float64.

    Args:
        ddf: ``[B, 3, D, H, W]`` displacement in voxels (checked by the caller; every spatial size at least 2).

    Returns:
        the ``[B, 3, D, H, W]`` gradient (float32 at least).
    """
    ddf = ddf.to(torch.promote_types(ddf.dtype, torch.float32))
    gradient = torch.zeros_like(ddf)
    for axis in (2, 3, 4):
        differences = torch.diff(ddf, dim=axis)
        differences.mul_(2.0 / (3.0 * differences.numel()))
        size = ddf.shape[axis]
        gradient.narrow(axis, 1, size - 1).add_(differences)
        gradient.narrow(axis, 0, size - 1).sub_(differences)
    return gradient


def soft_dice_loss(
    moving_label: torch.Tensor, fixed_label: torch.Tensor, ddf: torch.Tensor, labels: Sequence[int] | None = None
) -> torch.Tensor:
    r"""``1 - soft Dice`` between the moving labels warped by ``ddf`` and the fixed labels (differentiable in ``ddf``).

    Each label ``l`` gives an indicator map ``m_l`` of the moving labels, warped trilinearly,
    ``p_l = warp(m_l, ddf)`` (border padding, the MONAI ``Warp`` convention), and the fixed indicator ``q_l``;
    per sample and label, ``Dice_l = 2 sum(p_l q_l) / (sum p_l + sum q_l)``. The loss is ``1 -`` the mean of
    ``Dice_l`` over the (sample, label) couples where the label is in the moving or the fixed map (a label absent
    from both is skipped, not counted as 0 or 1); 0 when no label is present at all.

    Args:
        moving_label: ``[B, 1, *S]`` integer label map of the moving image.
        fixed_label: ``[B, 1, *S]`` integer label map of the fixed image.
        ddf: ``[B, 3, *S]`` displacement in voxels.
        labels: label values scored; ``None``: every non-zero value of either map.

    Returns:
        the scalar loss (float32 at least).
    """
    check_ddf(ddf, "ddf")
    check_same_spatial_shape(moving_label, ddf, "moving_label", "ddf")
    if moving_label.shape != fixed_label.shape or moving_label.shape[1] != 1:
        raise ValueError(
            "moving_label and fixed_label must both be [B, 1, *S] label maps of the field's shape, got "
            f"{tuple(moving_label.shape)} and {tuple(fixed_label.shape)}."
        )
    if labels is None:
        values = torch.unique(torch.cat([moving_label.flatten(), fixed_label.flatten()]))
        values = values[values != 0]
    else:
        values = torch.as_tensor([check_integer(v, "labels") for v in labels], device=moving_label.device)
    dtype = torch.promote_types(ddf.dtype, torch.float32)
    if values.numel() == 0:
        return ddf.new_zeros((), dtype=dtype)
    values = values.to(moving_label.device).view(1, -1, 1, 1, 1)
    moving_maps = (moving_label == values).to(dtype)
    fixed_maps = (fixed_label == values).to(dtype)
    warped = spatial.warp(moving_maps, ddf.to(dtype))
    axes = (2, 3, 4)
    intersection = (warped * fixed_maps).sum(axes)
    sizes = warped.sum(axes) + fixed_maps.sum(axes)
    present = (moving_maps.sum(axes) + fixed_maps.sum(axes)) > 0
    if not bool(present.any()):
        return ddf.new_zeros((), dtype=dtype)
    dice = 2.0 * intersection[present] / sizes[present].clamp_min(torch.finfo(dtype).tiny)
    return 1.0 - dice.mean()
