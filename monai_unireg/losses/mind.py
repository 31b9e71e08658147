"""MIND-SSC: the modality independent neighbourhood descriptor with self-similarity context, and its loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.loss import _Loss

from monai_unireg.filtering import separable_filter
from monai_unireg.validation import check_image, check_integer, check_reduction

__all__ = ["MINDSSC", "MINDSSCLoss", "SSC_EDGES"]


# The 12 edges of the self-similarity context: pairs of the six face neighbours (offsets in units of the
# dilation, spatial-axis order D, H, W) that are sqrt(2) apart, i.e. every pair except the 3 opposite ones.
# Channel order is the one of the Learn2Reg / ConvexAdam / PromptReg reference implementation, so descriptors
# are interchangeable with features computed by that code.
SSC_EDGES: tuple[tuple[tuple[int, int, int], tuple[int, int, int]], ...] = (
    ((1, 0, 0), (0, -1, 0)),
    ((0, 1, 0), (-1, 0, 0)),
    ((0, -1, 0), (-1, 0, 0)),
    ((0, 1, 0), (1, 0, 0)),
    ((0, -1, 0), (0, 0, -1)),
    ((0, 1, 0), (0, 0, 1)),
    ((0, 0, -1), (-1, 0, 0)),
    ((1, 0, 0), (0, 0, 1)),
    ((0, 1, 0), (0, 0, -1)),
    ((0, 0, 1), (0, -1, 0)),
    ((1, 0, 0), (0, 0, -1)),
    ((0, 0, 1), (-1, 0, 0)),
)
# Floor on the local variance (squared-intensity units): keeps a perfectly flat image finite (descriptor 1).
_MIN_VARIANCE = 1e-12


def _check_single_channel_volume(x: torch.Tensor, name: str) -> None:
    check_image(x, name, 3)
    if x.shape[1] != 1:
        raise ValueError(f"{name} must have one channel [B, 1, D, H, W], got shape {tuple(x.shape)}.")


def _edge_differences(image: torch.Tensor, dilation: int) -> torch.Tensor:
    """``[B, 12, *S]``: ``I(x + dilation * p_k) - I(x + dilation * q_k)`` per edge, indices clamped to the grid."""
    padded = F.pad(image, [dilation] * 6, mode="replicate")[:, 0]
    size = image.shape[2:]

    def shifted(offset: tuple[int, int, int]) -> torch.Tensor:
        starts = [dilation * (1 + o) for o in offset]
        return padded[(slice(None), *(slice(start, start + n) for start, n in zip(starts, size)))]

    return torch.stack([shifted(p) - shifted(q) for p, q in SSC_EDGES], dim=1)


def _box_mean(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Mean over the ``(2 radius + 1)^3`` cube around every voxel of ``x`` ``[B, C, *S]``, replicate padding."""
    width = 2 * radius + 1
    kernel = torch.full((width,), 1.0 / width, dtype=torch.float64)
    return separable_filter(x, kernel, spatial_dims=3, padding_mode="replicate")


class MINDSSC(nn.Module):
    r"""MIND-SSC descriptor (Heinrich et al., "Towards realtime multimodal fusion for image-guided interventions
    using self-similarities", MICCAI 2013; MIND: Heinrich et al., Medical Image Analysis 16(7), 2012).

    For the 12 edges ``(p, q)`` of :data:`SSC_EDGES` (pairs of face neighbours at offsets ``dilation * p`` and
    ``dilation * q``, ``sqrt(2) * dilation`` apart):

    .. math::

        D_k(x) = \frac{1}{|W|} \sum_{y \in W(x)} (I(y + d\,p_k) - I(y + d\,q_k))^2, \quad
        M_k(x) = D_k(x) - \min_j D_j(x), \quad
        V(x) = \frac{1}{12} \sum_k M_k(x),

        \mathrm{MIND}_k(x) = \exp\left(-\frac{M_k(x)}{\mathrm{clamp}(V(x), 10^{-3}\bar V, 10^3\bar V)}\right),

    with ``W(x)`` the ``(2 radius + 1)^3`` cube, replicate padding for the shifts and the window (the
    ``ConvexAdam``/Learn2Reg reference behaviour). Subtracting the minimum is the same as dividing
    ``exp(-D_k / V)`` by its maximum over the 12 channels, so the largest channel is 1. The descriptor is
    invariant to ``a I + b`` for ``a > 0`` (``D``, ``M``, ``V`` all scale by ``a^2``).

    Differences from the reference code: the clamp bounds use :math:`\bar V`, the mean of ``V`` over each sample
    (not over the whole batch), so every sample's descriptor is independent of the rest of the batch; the
    bounds carry no gradient (as there); ``V`` is floored at ``1e-12`` so that a flat image gives a
    descriptor of 1 instead of NaN.

    Args:
        radius: half width of the patch (box) window; 2 in PromptReg and VoxelOpt.
        dilation: distance of the six neighbours from the centre voxel; 2 in PromptReg and VoxelOpt.
    """

    def __init__(self, radius: int = 2, dilation: int = 2) -> None:
        super().__init__()
        self.radius = check_integer(radius, "radius", 0)
        self.dilation = check_integer(dilation, "dilation", 1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Compute the descriptor.

        Args:
            image: ``[B, 1, D, H, W]`` image (one channel), any floating dtype.

        Returns:
            ``[B, 12, D, H, W]`` descriptor in (0, 1], computed and returned in float32 at least
            (float64 stays float64, float16 gives float32).
        """
        _check_single_channel_volume(image, "image")
        x = image.to(torch.promote_types(image.dtype, torch.float32))
        distance = _box_mean(_edge_differences(x, self.dilation).square(), self.radius)
        distance = distance - distance.min(dim=1, keepdim=True).values
        variance = distance.mean(dim=1, keepdim=True)
        # summed in float64, so that the rounded float32 value does not depend on how many threads summed it
        mean_variance = variance.detach().mean(dim=(2, 3, 4), keepdim=True, dtype=torch.float64).to(variance.dtype)
        lower = (1e-3 * mean_variance).clamp_min(_MIN_VARIANCE)
        upper = (1e3 * mean_variance).clamp_min(_MIN_VARIANCE)
        variance = torch.minimum(torch.maximum(variance, lower), upper)
        return torch.exp(-distance / variance)


class MINDSSCLoss(_Loss):
    """Mean squared difference of MIND-SSC descriptors, the PromptReg similarity loss.

    ``L = mean_{b, k, x} (MIND_k(pred)(x) - MIND_k(target)(x))^2`` with :class:`MINDSSC` (12 channels).
    It is 0 for identical images and, the descriptor being local and intensity-normalised, suited to
    multimodal pairs (Heinrich et al., MICCAI 2013).

    Args:
        radius: patch half width of the descriptor (PromptReg: 2).
        dilation: neighbour distance of the descriptor (PromptReg: 2).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (the per-voxel, per-channel map ``[B, 12, D, H, W]``).
    """

    def __init__(self, radius: int = 2, dilation: int = 2, reduction: str = "mean") -> None:
        super().__init__(reduction=check_reduction(reduction))
        self.descriptor = MINDSSC(radius=radius, dilation=dilation)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Compute the loss.

        Args:
            pred: ``[B, 1, D, H, W]`` image (e.g. the warped moving image).
            target: ``[B, 1, D, H, W]`` image of the same shape (e.g. the fixed image).

        Returns:
            the reduced loss, or ``[B, 12, D, H, W]`` for ``reduction="none"``; float32 at least.
        """
        _check_single_channel_volume(pred, "pred")
        _check_single_channel_volume(target, "target")
        if pred.shape != target.shape:
            raise ValueError(
                f"pred and target must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}."
            )
        squared = (self.descriptor(pred) - self.descriptor(target)) ** 2
        if self.reduction == "mean":
            return squared.mean()
        if self.reduction == "sum":
            return squared.sum()
        return squared
