"""Local cost volumes over the 27 integer neighbours {-1, 0, 1}^3 of every voxel."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from monai_unireg.validation import check_image, check_option

__all__ = ["NEIGHBOUR_OFFSETS", "neighbour_cost_volume", "offsets_to_field", "tied_argmin_field"]

#: ``[27, 3]`` offsets ``o`` in voxels, in ``itertools.product((-1, 0, 1), repeat=3)`` order (index 13 is zero).
NEIGHBOUR_OFFSETS = torch.tensor(list(itertools.product((-1, 0, 1), repeat=3)), dtype=torch.float32)

COST_METRICS = ("l1", "dot")


def neighbour_cost_volume(fixed: torch.Tensor, moving: torch.Tensor, metric: str = "l1") -> torch.Tensor:
    """Compare each fixed voxel with the 27 moving voxels around it.

    ``C(x, o) = mean_c |f_c(x) - m_c(x + o)|`` (``"l1"``, VoxelOpt Eq. 3) or ``sum_c f_c(x) m_c(x + o)``
    (``"dot"``, a correlation score), for ``o`` in :data:`NEIGHBOUR_OFFSETS`; moving features outside the
    volume are zero (zero padding, as the VoxelOpt reference code). Without autograd the volume is filled in place
    through one scratch buffer; when an input requires gradients it is built out of place (differentiable).

    Args:
        fixed: ``[B, C, D, H, W]`` fixed features.
        moving: ``[B, C, D, H, W]`` moving features on the same grid.
        metric: ``"l1"`` or ``"dot"``.

    Returns:
        ``[B, 27, D, H, W]`` cost (or score) volume, channel ``k`` for offset ``NEIGHBOUR_OFFSETS[k]``.
    """
    check_image(fixed, "fixed", finite=False)
    check_image(moving, "moving", finite=False)
    if fixed.shape != moving.shape:
        raise ValueError(
            f"fixed and moving must have the same shape, got {tuple(fixed.shape)} and {tuple(moving.shape)}."
        )
    check_option(metric, "metric", COST_METRICS)
    depth, height, width = fixed.shape[2:]
    padded = F.pad(moving, (1, 1, 1, 1, 1, 1))
    windows = [
        padded[:, :, 1 + dz : 1 + dz + depth, 1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width]
        for dz, dy, dx in NEIGHBOUR_OFFSETS.long().tolist()
    ]
    if torch.is_grad_enabled() and (fixed.requires_grad or moving.requires_grad):  # differentiable, out-of-place
        compare = (lambda a, b: (a - b).abs().mean(1)) if metric == "l1" else (lambda a, b: (a * b).sum(1))
        return torch.stack([compare(fixed, shifted) for shifted in windows], dim=1)
    dtype = torch.promote_types(fixed.dtype, moving.dtype)
    cost = torch.empty(fixed.shape[0], len(NEIGHBOUR_OFFSETS), depth, height, width, dtype=dtype, device=fixed.device)
    product = torch.empty_like(fixed, dtype=dtype)  # one scratch buffer for every offset
    for index, shifted in enumerate(windows):
        if metric == "l1":
            torch.sum(torch.sub(fixed, shifted, out=product).abs_(), 1, out=cost[:, index])
        else:
            torch.sum(torch.mul(fixed, shifted, out=product), 1, out=cost[:, index])
    return cost.div_(fixed.shape[1]) if metric == "l1" else cost


def offsets_to_field(index: torch.Tensor) -> torch.Tensor:
    """Per-voxel offset indices ``[B, D, H, W]`` into :data:`NEIGHBOUR_OFFSETS` -> field ``[B, 3, D, H, W]``.

    The field is channel-first in memory (one lookup per component), as the filters that smooth it expect.
    """
    components = NEIGHBOUR_OFFSETS.T.to(index.device)  # [3, 27]
    return components[:, index].movedim(0, 1).contiguous()


def tied_argmin_field(cost: torch.Tensor, tolerance: float | torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Per-voxel displacement of the cheapest offset, ties resolved by the mean of every tied offset.

    ``v(x) = mean {o : C(x, o) <= min_o' C(x, o') + tolerance}``. Where the costs carry no information (all 27
    equal, as in an exactly flat region of both images, or any symmetric set of equal minima) this is exactly 0,
    so such a voxel does not move on its own; a unique minimum gives that offset, as a plain argmin does. The
    authors' VoxelOpt code sums the tied offsets instead (zero only for symmetric ties) and ``argmin`` takes the
    first one: both are biases that compound over the pyramid (``shared/reference/METHODS.md``). Deterministic:
    one matrix product over the 27 offsets per voxel, no thread-dependent reduction order.

    Args:
        cost: ``[N, 27]`` costs, one row per voxel.
        tolerance: costs within this of the row's minimum count as tied (>= 0): a number, or ``[N, 1]`` per row.
        offsets: ``[27, 3]`` offsets (:data:`NEIGHBOUR_OFFSETS` on ``cost``'s device and dtype).

    Returns:
        ``[N, 3]`` displacement per voxel, each component in [-1, 1].
    """
    threshold = cost.amin(-1, keepdim=True).add_(tolerance)
    tied = (cost <= threshold).to(cost.dtype)
    return (tied @ offsets).div_(tied.sum(-1, keepdim=True))
