"""Separable linear filtering of volumes by banded matrix products (used by LNCC, MIND-SSC and others)."""

from __future__ import annotations

import math

import torch

from monai_unireg.validation import check_option

__all__ = ["window_matrix", "separable_filter"]

PADDING_MODES = ("zeros", "replicate")


def window_matrix(kernel: torch.Tensor, size: int, padding_mode: str = "zeros") -> torch.Tensor:
    """The 1D filter ``y_i = sum_k w_k x_{i + k - half}`` on ``size`` samples as a ``[size, size]`` matrix.

    Args:
        kernel: ``[K]`` weights ``w`` (``K`` odd, centred).
        size: number of samples.
        padding_mode: ``"zeros"`` (samples outside are 0: the band is cut at the borders) or ``"replicate"``
            (outside samples take the edge value: the cut weights are added to the first/last column).

    Returns:
        ``[size, size]`` banded matrix ``T`` in the dtype and on the device of ``kernel``; ``y = T x``.
    """
    check_option(padding_mode, "padding_mode", PADDING_MODES)
    taps = kernel.shape[0]
    rows = torch.arange(size, device=kernel.device).repeat(taps)
    tap = torch.arange(taps, device=kernel.device).repeat_interleave(size)
    cols, weights = rows + tap - taps // 2, kernel[tap]
    if padding_mode == "replicate":
        cols = cols.clamp(0, size - 1)
    else:
        inside = (cols >= 0) & (cols < size)
        rows, cols, weights = rows[inside], cols[inside], weights[inside]
    matrix = torch.zeros(size, size, dtype=kernel.dtype, device=kernel.device)
    return matrix.index_put_((rows, cols), weights, accumulate=True)


#: The banded matrices of the filters run so far, by kernel, size, padding, dtype and device: an optimiser calls
#: the same few filters at every step (the refinement: four per step), and building a matrix takes about ten
#: small tensor operations per axis, which at a coarse level cost more than the filtering.
_MATRICES: dict[tuple, torch.Tensor] = {}
_MATRIX_CACHE_SIZE = 64


def _cached_window_matrix(kernel: torch.Tensor, size: int, padding_mode: str) -> torch.Tensor:
    """:func:`window_matrix`, kept for the next call with the same weights (at most ``_MATRIX_CACHE_SIZE``); a
    kernel that carries a gradient is not cached."""
    if kernel.requires_grad:
        return window_matrix(kernel, size, padding_mode)
    key = (tuple(kernel.tolist()), size, padding_mode, kernel.dtype, kernel.device)
    matrix = _MATRICES.get(key)
    if matrix is None:
        if len(_MATRICES) >= _MATRIX_CACHE_SIZE:
            _MATRICES.pop(next(iter(_MATRICES)))
        matrix = _MATRICES[key] = window_matrix(kernel, size, padding_mode)
    return matrix


def separable_filter(
    x: torch.Tensor, kernel: torch.Tensor, spatial_dims: int, padding_mode: str = "zeros"
) -> torch.Tensor:
    """Filter the last ``spatial_dims`` axes of ``x`` ``[..., *S]`` with the same 1D ``kernel`` along each.

    Each pass is one matrix product with the banded matrix of :func:`window_matrix` along that axis: no
    transpose, no padded copy, optimised GEMM kernels, and autograd keeps only the small matrix for the
    backward pass. On the CPU this is several times faster than ``conv3d`` with ``k x 1 x 1`` kernels
    (and than ``avg_pool3d``) for registration-sized windows; cost per voxel grows with the axis length
    (``O(N)`` instead of ``O(k)``), which pays off for ``N`` up to a few hundred.

    Args:
        x: ``[..., *S]`` floating tensor.
        kernel: ``[K]`` 1D weights (odd ``K``), cast to the dtype and device of ``x``.
        spatial_dims: number of trailing axes to filter.
        padding_mode: ``"zeros"`` or ``"replicate"`` (see :func:`window_matrix`).

    Returns:
        tensor of the shape of ``x``.
    """
    shape = x.shape
    spatial = shape[len(shape) - spatial_dims :]
    kernel = kernel.to(device=x.device, dtype=x.dtype)
    x = x.reshape(-1, *spatial)
    for axis, size in enumerate(spatial):
        matrix = _cached_window_matrix(kernel, size, padding_mode)
        if axis == spatial_dims - 1:
            x = torch.matmul(x, matrix.t())
        else:
            outer = x.shape[0] * math.prod(spatial[:axis])
            x = torch.matmul(matrix, x.reshape(outer, size, -1)).reshape(x.shape)
    return x.reshape(shape)
