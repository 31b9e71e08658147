"""Local normalised cross-correlation (LNCC) with a Gaussian or box window, computed by separable filtering."""

from __future__ import annotations

import math

import torch
from torch.nn.modules.loss import _Loss

from monai_unireg.filtering import separable_filter
from monai_unireg.validation import check_bool, check_image, check_option, check_positive, check_reduction

__all__ = ["LNCCLoss", "window_kernel"]

KERNEL_TYPES = ("gaussian", "box")


def window_kernel(kernel_type: str = "gaussian", sigma: float = 5.0, kernel_size: int | None = None) -> torch.Tensor:
    """The normalised 1D window of :class:`LNCCLoss` (float64, sums to 1).

    Args:
        kernel_type: ``"gaussian"``: ``w_k ~ exp(-k^2 / (2 sigma^2))`` for ``|k| <= (kernel_size - 1) / 2``;
            ``"box"``: ``w_k = 1 / kernel_size``.
        sigma: Gaussian standard deviation in voxels (ignored for ``"box"``).
        kernel_size: odd window length; ``None`` gives ``2 * ceil(2 sigma) + 1`` (truncation at two sigma,
            21 for sigma 5 as in uniGradICON) for ``"gaussian"`` and 9 for ``"box"`` (VoxelMorph, SACB-Net).

    Returns:
        ``[kernel_size]`` kernel.
    """
    check_option(kernel_type, "kernel_type", KERNEL_TYPES)
    check_positive(sigma, "sigma")
    if kernel_size is None:
        kernel_size = 2 * math.ceil(2 * sigma) + 1 if kernel_type == "gaussian" else 9
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be an odd positive integer or None, got {kernel_size!r}.")
    if kernel_type == "box":
        return torch.full((kernel_size,), 1.0 / kernel_size, dtype=torch.float64)
    half = kernel_size // 2
    offsets = torch.arange(-half, half + 1, dtype=torch.float64)
    weights = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return weights / weights.sum()


class LNCCLoss(_Loss):
    r"""Local normalised cross-correlation loss for image registration.

    With ``E[.]`` the windowed mean (the normalised window ``w`` of :func:`window_kernel`, applied separably
    along every spatial axis, zero padding outside the image as in uniGradICON's ``icon_registration`` and
    MONAI), per voxel and channel:

    .. math::

        \sigma^2_a = \max(E[a^2] - E[a]^2, 0), \quad
        \mathrm{cov} = E[ab] - E[a]E[b], \quad
        \mathrm{lncc} = \frac{\mathrm{cov}}{\sqrt{(\sigma^2_a + \epsilon)(\sigma^2_b + \epsilon)}},

    and the loss is ``1 - mean(lncc)`` (``squared=True``: ``1 - mean(lncc^2)``, insensitive to the sign of
    the correlation, for multimodal pairs). This is the uniGradICON similarity (Tian et al., "uniGradICON: A
    Foundation Model for Medical Image Registration", MICCAI 2024): Gaussian window of sigma 5 voxels
    truncated to 21 taps, ``eps = 1e-5`` added to each variance (the clamp at 0 only removes negative
    round-off). A window over a constant region has both variances 0 and ``lncc = 0``, so the loss stays
    finite on constant images; with zero padding, windows that overlap the image border see a step there
    (as in the reference implementations).

    Relation to ``monai.losses.LocalNormalizedCrossCorrelationLoss`` (gaussian): MONAI's window of size
    ``k`` has sigma ``k / 3`` (7 for ``k = 21``), it always returns the *negative squared* ``lncc`` and clamps
    each windowed variance *sum* at ``smooth_dr`` instead of adding ``eps``. With
    ``LNCCLoss(sigma=7.0, kernel_size=21, squared=True, eps=1e-12)`` the two agree (``ours - 1 = MONAI``)
    wherever MONAI's clamp is inactive, i.e. on any image without flat windows.

    The five moments are filtered together by :func:`separable_filter` (one banded matrix product per axis).

    Args:
        spatial_dims: number of spatial axes, 1, 2 or 3.
        kernel_type: ``"gaussian"`` or ``"box"`` (uniform window).
        sigma: Gaussian standard deviation in voxels (ignored for ``"box"``).
        kernel_size: odd window length, ``None`` for the default of :func:`window_kernel`.
        squared: use ``lncc^2`` (multimodal) instead of ``lncc``.
        eps: positive constant added to each local variance.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (the per-voxel map ``1 - lncc``, ``[B, C, *S]``).
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        kernel_type: str = "gaussian",
        sigma: float = 5.0,
        kernel_size: int | None = None,
        squared: bool = False,
        eps: float = 1e-5,
        reduction: str = "mean",
    ) -> None:
        super().__init__(reduction=check_reduction(reduction))
        self.spatial_dims = check_option(spatial_dims, "spatial_dims", (1, 2, 3))
        self.squared = check_bool(squared, "squared")
        self.eps = float(check_positive(eps, "eps"))
        self.kernel: torch.Tensor
        self.register_buffer("kernel", window_kernel(kernel_type, sigma, kernel_size), persistent=False)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Compute the loss.

        Args:
            pred: ``[B, C, *S]`` image (e.g. the warped moving image), any floating dtype.
            target: ``[B, C, *S]`` image of the same shape (e.g. the fixed image).

        Returns:
            the reduced loss, or ``[B, C, *S]`` for ``reduction="none"``; computed and returned in float32
            at least (float64 inputs stay float64, float16 inputs give float32).
        """
        check_image(pred, "pred", self.spatial_dims)
        check_image(target, "target", self.spatial_dims)
        if pred.shape != target.shape:
            raise ValueError(
                f"pred and target must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}."
            )
        lncc = self.local_correlation(pred, target)
        per_voxel = 1.0 - (lncc * lncc if self.squared else lncc)
        if self.reduction == "mean":
            return per_voxel.mean()
        if self.reduction == "sum":
            return per_voxel.sum()
        return per_voxel

    def local_correlation(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The map ``lncc`` ``[B, C, *S]`` (see the class docstring) for two validated images of equal shape."""
        dtype = torch.promote_types(torch.promote_types(pred.dtype, target.dtype), torch.float32)
        a, b = pred.to(dtype), target.to(dtype)
        moments = torch.stack([a, b, a * a, b * b, a * b])
        mean_a, mean_b, mean_aa, mean_bb, mean_ab = separable_filter(moments, self.kernel, self.spatial_dims).unbind(0)
        var_a = torch.relu(mean_aa - mean_a * mean_a)
        var_b = torch.relu(mean_bb - mean_b * mean_b)
        cov = mean_ab - mean_a * mean_b
        return cov / torch.sqrt((var_a + self.eps) * (var_b + self.eps))
