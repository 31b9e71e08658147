"""Gradient inverse consistency (GradICON) regulariser of a forward/backward pair of displacement fields."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn.modules.loss import _Loss

from monai_unireg.spatial import cascade_displacement, identity_grid
from monai_unireg.validation import (
    check_bool,
    check_ddf,
    check_integer,
    check_positive,
    check_reduction,
    check_tensor,
)

__all__ = ["GradICONLoss"]


class GradICONLoss(_Loss):
    r"""Gradient inverse consistency loss (Tian et al., "GradICON: Approximate Diffeomorphisms via Gradient
    Inverse Consistency", CVPR 2023), the regulariser of uniGradICON (weight ``lambda = 1.5``).

    Fields follow the MONAI ``Warp`` convention in voxels: ``warp(image_A, ddf_ab) ~ image_B``, so
    ``phi_AB(x) = x + ddf_ab(x)`` maps points of B's grid to A's grid and ``phi_BA(x) = x + ddf_ba(x)``
    maps A's grid to B's grid (both images share one grid shape ``S``, as after uniGradICON's resizing). With a
    registration network ``net(moving, fixed) -> ddf``: ``ddf_ab = net(A, B)`` and ``ddf_ba = net(B, A)``.
    The inverse consistency error at a point ``x`` is

    .. math::

        e(x) = x - \phi_{AB}(\phi_{BA}(x)) = -\left(u_{BA}(x) + u_{AB}(x + u_{BA}(x))\right),

    with the fields sampled off-grid by (tri)linear interpolation, ``align_corners=True`` and border padding
    (as ``icon_registration``, whose fields extend by their edge values). Either map may be given as a cascade of
    step fields ``[u_1, ..., u_k]`` (``phi = phi_1 o ... o phi_k``, each on its own grid over one field of view, as
    :meth:`~monai_unireg.networks.nets.UniGradICON.pop_steps` hands them over): the steps are then evaluated one
    after another at the sample points (:func:`~monai_unireg.spatial.cascade_displacement`), the reference code's
    function composition, not a single field collapsed onto the grid first, which differs off the grid. Everything
    is measured in the normalised units of the reference code, ``[0, 1]`` per axis (one voxel along axis ``d`` is
    ``1 / (N_d - 1)``), so ``delta`` and the published weight keep their meaning at any grid size:

    .. math::

        L = \sum_{d} \operatorname{mean}_{c, x}
            \left(\frac{e_c(x) - e_c(x + \delta\,u_d)}{\delta}\right)^2,

    where ``u_d`` is the unit vector of axis ``d`` and the mean runs over the ``n`` components ``c`` and the
    sample points ``x``: the voxel grid taken every ``subsample`` voxels along each axis, each point moved by
    an independent jitter ``jitter_scale * randn / N_d`` (normalised units) per axis and batch sample.
    ``L = 0`` exactly when ``phi_AB`` inverts ``phi_BA`` at every sample point, whatever its size.

    Args:
        delta: finite-difference step in normalised units (reference: 0.001).
        subsample: keep every ``subsample``-th grid point per axis (reference: 2).
        jitter: add the random jitter to the sample points (reference: on).
        jitter_scale: jitter standard deviation times ``N_d`` in normalised units (reference: 2).
        seed: seed of a private CPU random generator for the jitter (reproducible sequence of losses);
            ``None`` uses PyTorch's global generator on the fields' device.
        reduction: ``"mean"`` (over the batch), ``"sum"`` (over the batch) or ``"none"`` (``[B]``, one value
            per sample).
    """

    def __init__(
        self,
        delta: float = 0.001,
        subsample: int = 2,
        jitter: bool = True,
        jitter_scale: float = 2.0,
        seed: int | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__(reduction=check_reduction(reduction))
        self.delta = float(check_positive(delta, "delta"))
        self.subsample = check_integer(subsample, "subsample", 1)
        self.jitter = check_bool(jitter, "jitter")
        self.jitter_scale = float(check_positive(jitter_scale, "jitter_scale"))
        self.generator = None if seed is None else torch.Generator().manual_seed(check_integer(seed, "seed"))

    def forward(
        self, ddf_ab: torch.Tensor | Sequence[torch.Tensor], ddf_ba: torch.Tensor | Sequence[torch.Tensor]
    ) -> torch.Tensor:
        """Compute the loss.

        Args:
            ddf_ab: ``[B, n, *S]`` field registering A onto B (``warp(A, ddf_ab) ~ B``), in voxels, ``n`` = 2 or 3;
                or the step fields ``[u_1, ..., u_k]`` of a cascade, the last on the grid ``S`` (the finest).
            ddf_ba: field (or step fields) registering B onto A, on the same grid ``S``.

        Returns:
            the reduced loss, or ``[B]`` for ``reduction="none"``; float32 at least (float64 stays float64).
        """
        steps_ab, steps_ba = _as_steps(ddf_ab, "ddf_ab"), _as_steps(ddf_ba, "ddf_ba")
        dtype = torch.float32
        for field in (*steps_ab, *steps_ba):
            dtype = torch.promote_types(dtype, field.dtype)
        steps_ab, steps_ba = [f.to(dtype) for f in steps_ab], [f.to(dtype) for f in steps_ba]
        ddf_ab, ddf_ba = steps_ab[-1], steps_ba[-1]
        check_tensor(ddf_ab, "ddf_ab", finite=False)
        if ddf_ab.ndim not in (4, 5):
            raise ValueError(
                f"ddf_ab must be a field [B, 2, H, W] or [B, 3, D, H, W], got shape {tuple(ddf_ab.shape)}."
            )
        spatial_dims = ddf_ab.ndim - 2
        check_ddf(ddf_ab, "ddf_ab", spatial_dims)
        check_ddf(ddf_ba, "ddf_ba", spatial_dims)
        if ddf_ab.shape != ddf_ba.shape:
            raise ValueError(
                f"ddf_ab and ddf_ba must have the same shape, got {tuple(ddf_ab.shape)} and {tuple(ddf_ba.shape)}."
            )
        if min(ddf_ab.shape[2:]) < 2:
            raise ValueError(f"ddf_ab needs at least 2 voxels along every spatial axis, got {tuple(ddf_ab.shape)}.")
        shape = ddf_ab.shape[2:]
        voxel = torch.tensor([1.0 / (s - 1) for s in shape], device=ddf_ab.device, dtype=dtype)
        voxel = voxel.view(1, -1, *([1] * spatial_dims))
        points = self._sample_points(ddf_ab.shape[0], shape, voxel)
        probes = [points] + [points + self._step(d, voxel) for d in range(spatial_dims)]
        errors = self._inverse_consistency_error(steps_ab, steps_ba, torch.cat(probes, dim=2), shape) * voxel
        errors = errors.chunk(spatial_dims + 1, dim=2)
        per_sample = sum((((errors[0] - moved) / self.delta) ** 2).flatten(1).mean(dim=1) for moved in errors[1:])
        if self.reduction == "mean":
            return per_sample.mean()
        if self.reduction == "sum":
            return per_sample.sum()
        return per_sample

    def _sample_points(self, batch: int, shape: torch.Size, voxel: torch.Tensor) -> torch.Tensor:
        """``[B, n, *P]`` voxel coordinates: the subsampled identity grid plus the jitter."""
        grid = identity_grid(shape, device=voxel.device, dtype=voxel.dtype)
        grid = grid[(slice(None),) + (slice(None, None, self.subsample),) * len(shape)]
        points = grid.unsqueeze(0).expand(batch, *grid.shape)
        if not self.jitter:
            return points
        noise_device = voxel.device if self.generator is None else self.generator.device
        noise = torch.randn(points.shape, generator=self.generator, device=noise_device, dtype=voxel.dtype)
        size = torch.tensor(list(shape), device=voxel.device, dtype=voxel.dtype).view_as(voxel)
        return points + noise.to(voxel.device) * self.jitter_scale / size / voxel

    def _step(self, axis: int, voxel: torch.Tensor) -> torch.Tensor:
        """``[1, n, 1, ...]`` displacement of ``delta`` normalised units along ``axis``, in voxels."""
        step = torch.zeros_like(voxel)
        step[:, axis] = self.delta / voxel[:, axis]
        return step

    @staticmethod
    def _inverse_consistency_error(
        steps_ab: Sequence[torch.Tensor], steps_ba: Sequence[torch.Tensor], points: torch.Tensor, shape: torch.Size
    ) -> torch.Tensor:
        """``x - phi_AB(phi_BA(x))`` in voxels at the voxel coordinates ``points`` ``[B, n, *P]`` of ``shape``."""
        backward = cascade_displacement(steps_ba, points, shape)
        return -(backward + cascade_displacement(steps_ab, points + backward, shape))


def _as_steps(value: torch.Tensor | Sequence[torch.Tensor], name: str) -> list[torch.Tensor]:
    """A field or a cascade's step fields as a non-empty list of tensors."""
    if isinstance(value, torch.Tensor):
        return [value]
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, torch.Tensor) for v in value):
        raise ValueError(f"{name} must be a displacement field tensor or a non-empty list of step fields.")
    return list(value)
